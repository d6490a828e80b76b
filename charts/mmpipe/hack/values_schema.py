"""Generates values.schema.json: `python charts/mmpipe/hack/values_schema.py > charts/mmpipe/values.schema.json`.

The schema is written in Python because its repeated blocks (one per service) are easier to keep consistent
here than in 1,700 lines of JSON; tests/test_deploy_chart.py fails when the committed JSON is stale.
"""
import json

def obj(props, required=(), additional=False, **kw):
    d = {"type": "object", "properties": props, "additionalProperties": additional}
    if required:
        d["required"] = list(required)
    d.update(kw)
    return d

STR = {"type": "string"}
BOOL = {"type": "boolean"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
MAP_STR = {"type": "object", "additionalProperties": {"type": "string"}}
ANY_OBJ = {"type": "object"}
QUANTITY = {"type": ["string", "number"], "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|M|G|T|P|E|Ei)?$"}

# GPU keys may only be set through gpu.count / gpu.resource: a typo ("nvidia.com/gpus") or another vendor's key
# in resources would otherwise schedule the pod without a GPU or never at all.
RESOURCE_LIST = {"type": "object",
                 "propertyNames": {"not": {"pattern": "gpu|/mig-"}},
                 "additionalProperties": QUANTITY}
RESOURCES = obj({"requests": RESOURCE_LIST, "limits": RESOURCE_LIST,
                 "claims": {"type": "array"}})

IMAGE_OVERRIDE = obj({
    "repository": {"type": "string", "minLength": 1},
    "tag": STR,
    "flavor": {"enum": ["cpu", "cuda"]},
    "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
})

PROBE = obj({k: {"type": "integer", "minimum": 1} for k in
             ("periodSeconds", "failureThreshold", "timeoutSeconds", "successThreshold")}
            | {"initialDelaySeconds": {"type": "integer", "minimum": 0}})

def hpa(queue: bool):
    props = {
        "enabled": BOOL,
        "minReplicas": {"type": "integer", "minimum": 1},
        "maxReplicas": {"type": "integer", "minimum": 1},
        "targetCPUUtilizationPercentage": {"type": "integer", "minimum": 0, "maximum": 100,
                                           "description": "0 = no CPU metric (GPU services: use queueTarget)"},
        "metrics": {"type": "array", "items": {"type": "object", "required": ["type"]}},
    }
    has_metric = [{"required": ["targetCPUUtilizationPercentage"],
                   "properties": {"targetCPUUtilizationPercentage": {"minimum": 1}}},
                  {"required": ["metrics"], "properties": {"metrics": {"minItems": 1}}}]
    if queue:
        props["queueTarget"] = {"type": "number", "minimum": 0,
                                "description": "average queue per pod to scale at; 0 = not this metric"}
        has_metric.append({"required": ["queueTarget"], "properties": {"queueTarget": {"exclusiveMinimum": 0}}})
    # Enabled autoscaling must name a metric: an HPA without one falls back to CPU, which says nothing about a GPU
    # stage's load.
    return obj(props, required=["enabled"],
               **{"if": {"required": ["enabled"], "properties": {"enabled": {"const": True}}},
                  "then": {"anyOf": has_metric}})

PDB = obj({
    "enabled": BOOL,
    "maxUnavailable": {"type": ["integer", "string"], "minimum": 0},
    "minAvailable": {"type": ["integer", "string"], "minimum": 0},
}, required=["enabled"])

ENV_LIST = {"type": "array", "items": {"type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string", "minLength": 1}}}}
TOLERATIONS = {"type": "array", "items": {"type": "object"}}
VOLUMES = {"type": "array", "items": {"type": "object", "required": ["name"]}}
MOUNTS = {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}}
SPREAD = {"type": "array", "items": {"type": "object", "required": ["maxSkew", "topologyKey", "whenUnsatisfiable"]}}
K8S_NAME = {"type": "string", "pattern": r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}

def component(grpc_port_key="port", gpu=False, extra=None):
    props = {
        "replicas": {"type": "integer", "minimum": 0},
        "image": IMAGE_OVERRIDE,
        grpc_port_key: PORT,
        "resources": RESOURCES,
        "nodeSelector": MAP_STR,
        "tolerations": TOLERATIONS,
        "affinity": ANY_OBJ,
        "autoscaling": hpa(queue=gpu),
        "pdb": PDB,
        "probes": obj({"startup": PROBE, "readiness": PROBE, "liveness": PROBE}),
        "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
        "extraEnv": ENV_LIST,
        "podAnnotations": MAP_STR,
        "podLabels": MAP_STR,
        "runtimeClassName": K8S_NAME,
        "priorityClassName": K8S_NAME,
        "topologySpreadConstraints": SPREAD,
        "extraVolumes": VOLUMES,
        "extraVolumeMounts": MOUNTS,
    }
    if gpu:
        props["gpu"] = obj({
            "count": {"type": "integer", "minimum": 0, "description": "GPUs per pod; 0 = CPU"},
            "resource": {"type": "string", "pattern": r"^nvidia\.com/(gpu|mig-[1-7]g\.[0-9]+gb)$",
                         "description": "nvidia.com/gpu or an NVIDIA MIG profile (the images are CUDA builds)"},
        }, required=["count", "resource"])
        props["shmSize"] = QUANTITY
    props.update(extra or {})
    return obj(props, required=["replicas", "image", grpc_port_key, "resources", "autoscaling", "pdb", "probes"]
               + (["gpu"] if gpu else []))

schema = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "mmpipe chart values",
    "type": "object",
    "additionalProperties": False,
    "required": ["image", "model", "redis", "gateway", "ingest", "encoder", "generator", "metrics"],
    "properties": {
        "global": ANY_OBJ,
        "nameOverride": STR,
        "fullnameOverride": STR,
        "clusterDomain": {"type": "string", "minLength": 1},
        "image": obj({
            "repository": {"type": "string", "minLength": 1},
            "tag": STR,
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        }, required=["repository"]),
        "imagePullSecrets": {"type": "array", "items": obj({"name": STR}, required=["name"])},
        "model": obj({
            "name": {"type": "string", "minLength": 1},
            "servedModelName": STR,
            "dtype": {"enum": ["auto", "bfloat16", "float16", "float32", "half", "float"]},
            "maxModelLen": {"type": "integer", "minimum": 0},
            "tiny": obj({"enabled": BOOL,
                         "family": {"enum": ["llava", "qwen2_vl", "qwen2_5_vl", "qwen2_audio",
                                             "llava_onevision", "qwen2_5_omni"]}}, required=["enabled"]),
            "hfTokenSecret": STR,
            "offline": BOOL,
            "cache": obj({"existingClaim": STR, "readOnly": BOOL, "sizeLimit": QUANTITY,
                          "pvcStorage": obj({"enabled": BOOL, "size": QUANTITY, "storageClass": STR,
                                             "accessModes": {"type": "array", "minItems": 1, "items": {
                                                 "enum": ["ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce",
                                                          "ReadWriteOncePod"]}}}, required=["enabled"])},
                         # one model cache: the chart's PVC or an existing claim, not both
                         **{"not": {"required": ["existingClaim", "pvcStorage"],
                                    "properties": {"existingClaim": {"minLength": 1},
                                                   "pvcStorage": {"properties": {"enabled": {"const": True}}}}}}),
        }, required=["name"]),
        "multimodal": obj({
            "limitMmPerPrompt": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
            "mediaIoKwargs": {"type": "object", "additionalProperties": {"type": "object"}},
            "allowedMediaDomains": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "allowedLocalMediaPath": STR,
            "enableMmEmbeds": BOOL,
        }),
        "logLevel": {"enum": ["debug", "info", "warning", "error"]},
        "bindHost": {"type": "string", "minLength": 1},
        "ompNumThreads": {"type": "integer", "minimum": 0},
        "extraEnv": ENV_LIST,
        "extraVolumes": VOLUMES,
        "extraVolumeMounts": MOUNTS,
        "grpc": obj({
            "maxConnectionAgeMs": {"type": "integer", "minimum": 0},
            "maxConnectionAgeGraceMs": {"type": "integer", "minimum": 0},
            "tls": obj({"enabled": BOOL, "secretName": STR, "mutual": BOOL, "serverName": STR}, required=["enabled"],
                       **{"if": {"properties": {"enabled": {"const": True}}},
                          "then": {"required": ["secretName"], "properties": {"secretName": {"minLength": 1}}}}),
        }),
        "networkPolicy": obj({"enabled": BOOL, "gatewayFrom": {"type": "array", "items": ANY_OBJ},
                              "metricsFrom": {"type": "array", "items": ANY_OBJ}}, required=["enabled"]),
        "keda": obj({"enabled": BOOL, "prometheusServerAddress": {"type": "string", "pattern": r"^https?://"},
                     "pollingInterval": {"type": "integer", "minimum": 1},
                     "cooldownPeriod": {"type": "integer", "minimum": 0}}, required=["enabled"]),
        "prometheusAdapter": obj({"rules": obj({"enabled": BOOL}, required=["enabled"])}),
        "tests": obj({"enabled": BOOL, "maxTokens": {"type": "integer", "minimum": 1}}, required=["enabled"]),
        "apiKey": obj({"enabled": BOOL, "existingSecret": STR, "secretKey": {"type": "string", "minLength": 1},
                       "value": STR}, required=["enabled"]),
        "redis": obj({
            "enabled": BOOL,
            "externalUrl": {"type": "string", "pattern": r"^$|^(redis|rediss|unix|redis\+cluster|rediss\+cluster)://"},
            "flavor": {"enum": ["redis", "valkey"]},
            "externalUrlSecret": obj({"name": STR, "key": {"type": "string", "minLength": 1}}),
            "image": obj({"repository": STR, "tag": STR,
                          "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}},
                         description="empty repository / tag: the flavor's image (redis:7.4-alpine, valkey/valkey:8.1-alpine)"),
            "port": PORT,
            "db": {"type": "integer", "minimum": 0, "maximum": 15},
            "maxmemory": {"type": "string", "pattern": r"^[0-9]+(b|kb|mb|gb|k|m|g)?$",
                          "description": "Redis size syntax, e.g. 4gb, 512mb"},
            "maxmemoryPolicy": {"enum": ["allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu",
                                         "allkeys-random", "volatile-random", "volatile-ttl"],
                                "description": "noeviction is refused: a full cache would fail writes"},
            "auth": obj({"enabled": BOOL, "existingSecret": STR, "secretKey": {"type": "string", "minLength": 1},
                         "password": {"type": "string", "pattern": r"^[A-Za-z0-9._~-]*$",
                                      "description": "URL-safe characters only: it is embedded in MMPIPE_REDIS_URL"}},
                        required=["enabled"]),
            "persistence": obj({"enabled": BOOL, "size": QUANTITY, "storageClass": STR}),
            "resources": RESOURCES,
            "nodeSelector": MAP_STR,
            "tolerations": TOLERATIONS,
            "affinity": ANY_OBJ,
            "exporter": obj({"enabled": BOOL, "port": PORT, "resources": RESOURCES,
                             "image": obj({"repository": {"type": "string", "minLength": 1},
                                           "tag": {"type": "string", "minLength": 1},
                                           "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}},
                                          required=["repository", "tag"])}, required=["enabled"]),
        }, required=["enabled"]),
        "gpuNodes": obj({"nodeSelector": MAP_STR, "tolerations": TOLERATIONS, "affinity": ANY_OBJ}),
        "serviceAccount": obj({"create": BOOL, "name": STR, "annotations": MAP_STR}),
        "podSecurityContext": ANY_OBJ,
        "securityContext": ANY_OBJ,
        "metrics": obj({
            "port": PORT,
            "serviceMonitor": obj({"enabled": BOOL, "interval": STR, "scrapeTimeout": STR, "labels": MAP_STR}),
            "grafanaDashboard": obj({"enabled": BOOL, "labels": MAP_STR, "annotations": MAP_STR}),
        }, required=["port"]),
        "gateway": component("grpcPort", extra={
            "httpPort": PORT,
            "service": obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "annotations": MAP_STR}),
            "ingress": obj({"enabled": BOOL, "className": STR, "annotations": MAP_STR, "host": STR,
                            "tls": {"type": "array", "items": ANY_OBJ}}, required=["enabled"]),
            "httpRoute": obj({"enabled": BOOL, "parentRefs": {"type": "array", "items": obj(
                {"name": {"type": "string", "minLength": 1}}, required=["name"], additional=True)},
                "hostnames": {"type": "array", "items": {"type": "string", "minLength": 1}}}, required=["enabled"],
                **{"if": {"properties": {"enabled": {"const": True}}},
                   "then": {"properties": {"parentRefs": {"minItems": 1}}, "required": ["parentRefs"]}}),
        }),
        "ingest": component(),
        "encoder": component(gpu=True),
        "generator": component(gpu=True),
    },
}
schema["properties"]["gateway"]["required"].append("httpPort")
print(json.dumps(schema, indent=2))
