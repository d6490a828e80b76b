"""The chart's scaling and isolation features (issue 15), offline like tests/test_deploy_chart.py (whose rendering
helpers it uses): GPU stages autoscaled on their queue metrics (HPA + prometheus-adapter rules, or KEDA), the
schema refusing autoscaling without a metric, gRPC connection age and TLS from a Secret, NetworkPolicies checked
by evaluating them, Ingress / HTTPRoute, Valkey and the Redis exporter, the shared model cache PVC, scheduling
keys, and the `helm test` hook.
"""
from __future__ import annotations

import re

import pytest
import yaml

from test_deploy_chart import (CHART, NAMESPACE, RELEASE, ROOT, STAGES, by_kind, component_of, container,
                               container_port, deployments, env_of, helm, objects, resolved_env, selects,
                               service_for_host, values_for)

QUEUE_METRICS = {"encoder": "mmpipe_encoder_queue_depth", "generator": "mmpipe_generator_engine_waiting_requests"}


def render(values: dict) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [d for p, t in out.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]


def refused(values: dict) -> bool:
    with helm.Chart.load(str(CHART)) as chart:
        try:
            chart.validate_schema(values)
        except helm.HelmValuesError:
            return True
    return False


# --- autoscaling on real signals ----------------------------------------------------------------------------------
def test_queue_metric_names_are_the_services_own() -> None:
    """The metrics the autoscalers read exist under these names (services/*/core.py + ServiceMetrics' prefix)."""
    source = {s: (ROOT / "services" / s / "core.py").read_text() for s in QUEUE_METRICS}
    for stage, metric in QUEUE_METRICS.items():
        short = metric.removeprefix(f"mmpipe_{stage}_")
        assert re.search(rf'\.gauge\(\s*"{short}"', source[stage]), metric


@pytest.mark.parametrize("case", [
    {"encoder": {"autoscaling": {"enabled": True}}},
    {"generator": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0, "metrics": []}}},
    {"gateway": {"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0}}},
    {"generator": {"autoscaling": {"enabled": True, "queueTarget": -1}}},
], ids=["encoder", "generator", "gateway", "negative queue target"])
def test_schema_refuses_autoscaling_without_a_metric(case: dict) -> None:
    assert refused(case)
    with pytest.raises(helm.HelmValuesError):  # and `helm install/template` refuses it too
        render(case)


def test_schema_accepts_each_kind_of_metric() -> None:
    for auto in ({"queueTarget": 2}, {"targetCPUUtilizationPercentage": 50},
                 {"metrics": [{"type": "Pods", "pods": {"metric": {"name": "x"}, "target": {"type": "Value"}}}]}):
        assert not refused({"encoder": {"autoscaling": {"enabled": True, **auto}}}), auto
    assert not refused({"encoder": {"autoscaling": {"enabled": False}}})


def test_hpa_scales_gpu_stages_on_queue_metrics_served_by_the_adapter_rules() -> None:
    objs = objects("multi-replica-autoscaling")
    hpas = {component_of(h): h for h in by_kind(objs, "HorizontalPodAutoscaler").values()}
    pods_metrics = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpas["encoder"]["spec"]["metrics"]
                    if m["type"] == "Pods"}
    assert pods_metrics == {QUEUE_METRICS["encoder"]: {"type": "AverageValue", "averageValue": "8"}}
    assert not any(m["type"] == "Resource" for m in hpas["encoder"]["spec"]["metrics"])  # no CPU fallback
    (cm,) = [o for o in by_kind(objs, "ConfigMap").values() if o["metadata"]["name"].endswith("adapter-rules")]
    rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    served = {r["name"]["as"] for r in rules}
    for comp in ("encoder", "generator"):
        for m in hpas[comp]["spec"]["metrics"]:
            if m["type"] == "Pods":
                assert m["pods"]["metric"]["name"] in served, (comp, m)
    for r in rules:  # per pod, so that AverageValue divides by the replica count
        assert r["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert r["seriesQuery"].startswith(r["name"]["as"] + "{")


def test_keda_scaled_objects_read_the_stage_queue_of_this_release() -> None:
    objs = objects("keda-secure")
    values = values_for("keda-secure")
    deps = deployments(objs)
    services = {component_of(s): s for s in by_kind(objs, "Service").values()}
    scaled = {component_of(o): o for o in by_kind(objs, "ScaledObject").values()}
    assert set(scaled) == {"encoder", "generator"} and not by_kind(objs, "HorizontalPodAutoscaler")
    for comp, so in scaled.items():
        spec = so["spec"]
        auto = values[comp]["autoscaling"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                          "name": deps[comp]["metadata"]["name"]}
        assert "replicas" not in deps[comp]["spec"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (auto["minReplicas"], auto["maxReplicas"])
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        md = trigger["metadata"]
        assert md["serverAddress"] == values["keda"]["prometheusServerAddress"]
        assert float(md["threshold"]) == auto["queueTarget"]
        m = re.fullmatch(r'sum\((\w+)\{namespace="([^"]+)", service="([^"]+)"\}\)', md["query"])
        assert m, md["query"]
        # the series the ServiceMonitor scrapes from this stage's Service (Prometheus labels it `service`)
        assert m.groups() == (QUEUE_METRICS[comp], NAMESPACE, services[comp]["metadata"]["name"])


def test_keda_refuses_raw_hpa_metric_specs() -> None:
    with pytest.raises(Exception, match="autoscaling.metrics are HPA metric specs"):
        render({"keda": {"enabled": True}, "generator": {"autoscaling": {"enabled": True, "metrics": [
            {"type": "Pods", "pods": {"metric": {"name": "x"}, "target": {"type": "AverageValue"}}}]}}})


# --- gRPC: connection age, TLS from a Secret ----------------------------------------------------------------------
def test_every_grpc_server_gets_the_connection_age() -> None:
    for rendering, age in (("default", "300000"), ("keda-secure", "120000")):
        for comp, dep in deployments(objects(rendering)).items():
            env = resolved_env(objects(rendering), container(dep))
            assert env["MMPIPE_GRPC_MAX_CONNECTION_AGE_MS"] == age, (rendering, comp)
            assert int(env["MMPIPE_GRPC_MAX_CONNECTION_AGE_GRACE_MS"]) > 0


def test_grpc_mtls_certificates_come_from_the_secret() -> None:
    objs = objects("keda-secure")
    secret = values_for("keda-secure")["grpc"]["tls"]["secretName"]
    for comp, dep in deployments(objs).items():
        pod = dep["spec"]["template"]["spec"]
        vol = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret)
        (mount,) = [m for m in container(dep)["volumeMounts"] if m["name"] == vol["name"]]
        assert mount["readOnly"] is True
        env = resolved_env(objs, container(dep))
        tls_files = {k: v for k, v in env.items() if re.fullmatch(r"MMPIPE_(STAGE_)?TLS_\w+_FILE", k)}
        assert tls_files and all(v.startswith(mount["mountPath"] + "/") for v in tls_files.values()), tls_files
        assert {v.rsplit("/", 1)[1] for v in tls_files.values()} <= {"tls.crt", "tls.key", "ca.crt"}
        if comp in STAGES:  # serves mTLS: its certificate, and the CA the callers' certificates must chain to
            assert {"MMPIPE_TLS_CERT_FILE", "MMPIPE_TLS_KEY_FILE", "MMPIPE_TLS_CA_FILE"} <= set(env), comp
        else:  # the gateway's public gRPC API keeps its own settings
            assert "MMPIPE_TLS_CERT_FILE" not in env
        if comp in ("gateway", "ingest"):  # callers: verify the stages, present the certificate
            assert {"MMPIPE_STAGE_TLS_CA_FILE", "MMPIPE_STAGE_TLS_CERT_FILE", "MMPIPE_STAGE_TLS_KEY_FILE"} <= set(env)
    assert refused({"grpc": {"tls": {"enabled": True}}})  # no Secret named


# --- NetworkPolicies, evaluated ------------------------------------------------------------------------------------
def _port_matches(rule_port: dict, target: dict, port: int) -> bool:
    p = rule_port.get("port")
    if p is None:
        return True
    if isinstance(p, int):
        return p == port
    return any(cp.get("name") == p and cp["containerPort"] == port for c in target["containers"]
               for cp in c.get("ports", []))


def allowed(objs: list[dict], src_labels: dict, dst: dict, port: int) -> bool:
    """Whether a pod with `src_labels` in the release's namespace may open `port` on workload `dst`'s pods."""
    dst_labels = dst["spec"]["template"]["metadata"]["labels"]
    pod = dst["spec"]["template"]["spec"]
    policies = [p for p in by_kind(objs, "NetworkPolicy").values()
                if "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"]["matchLabels"], dst_labels)]
    if not policies:
        return True
    for pol in policies:
        for rule in pol["spec"].get("ingress", []):
            if not any(_port_matches(rp, pod, port) for rp in rule.get("ports", [{}])):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                if "podSelector" in peer and "namespaceSelector" not in peer \
                        and selects(peer["podSelector"].get("matchLabels", {}), src_labels):
                    return True
    return False


def test_network_policies_let_only_the_callers_in() -> None:
    objs = objects("keda-secure")
    deps = deployments(objs)
    (redis_sts,) = by_kind(objs, "StatefulSet").values()
    labels = {c: d["spec"]["template"]["metadata"]["labels"] for c, d in deps.items()}
    stranger = {"app": "something-else"}
    grpc = {c: container_port(container(d), "grpc") for c, d in deps.items()}
    redis_port = container_port(redis_sts["spec"]["template"]["spec"]["containers"][0], "redis")
    expect = {  # (caller, callee): allowed
        ("gateway", "ingest"): True, ("gateway", "encoder"): True, ("gateway", "generator"): True,
        ("ingest", "encoder"): True, ("ingest", "generator"): False, ("encoder", "generator"): False,
        ("generator", "encoder"): False, ("encoder", "ingest"): False,
    }
    for (src, dst), ok in expect.items():
        assert allowed(objs, labels[src], deps[dst], grpc[dst]) is ok, (src, dst)
    for dst in STAGES:
        assert not allowed(objs, stranger, deps[dst], grpc[dst]), dst
        # metrics: from the monitoring namespace only (a namespaceSelector peer), not from pods here
        assert not allowed(objs, stranger, deps[dst], container_port(container(deps[dst]), "metrics"))
    for src, ok in (("encoder", True), ("generator", True), ("gateway", True), ("ingest", False)):
        assert allowed(objs, labels[src], redis_sts, redis_port) is ok, src
    assert not allowed(objs, stranger, redis_sts, redis_port)
    # the gateway: from the ingress controller's namespace and from the `helm test` pod
    (test_pod,) = [o for o in objs if o["kind"] == "Pod"]
    http = container_port(container(deps["gateway"]), "http")
    assert allowed(objs, test_pod["metadata"]["labels"], deps["gateway"], http)
    assert not allowed(objs, stranger, deps["gateway"], http)
    # without gatewayFrom the API is open to every pod (the default)
    open_objs = render({"networkPolicy": {"enabled": True}})
    assert allowed(open_objs, stranger, deployments(open_objs)["gateway"], 8000)
    assert not allowed(open_objs, stranger, deployments(open_objs)["encoder"], 50052)


# --- the rest of the values ---------------------------------------------------------------------------------------
def test_scheduling_keys_volumes_and_shared_model_cache() -> None:
    objs = objects("keda-secure")
    deps = deployments(objs)
    (pvc,) = by_kind(objs, "PersistentVolumeClaim").values()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "nfs-client"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for comp, dep in deps.items():
        pod = dep["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["model-cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        mounts = {m["name"]: m for m in container(dep)["volumeMounts"]}
        assert mounts["ca-bundle"]["mountPath"] == "/etc/ssl/corporate" and "ca-bundle" in vols  # global extras
        assert set(mounts) <= set(vols), comp
        gpu = comp in ("encoder", "generator")
        assert pod.get("runtimeClassName") == ("nvidia" if gpu else None), comp
        assert pod.get("priorityClassName") == ("mmpipe-gpu" if gpu else None), comp
        for tsc in pod.get("topologySpreadConstraints", []):  # spread over this component's own pods
            assert selects(tsc["labelSelector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
            assert tsc["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == comp
    assert "kernels" in {m["name"] for m in container(deps["generator"])["volumeMounts"]}
    assert "kernels" not in {m["name"] for m in container(deps["encoder"])["volumeMounts"]}
    assert env_of(container(deps["generator"]))["NCCL_DEBUG"]["value"] == "WARN"
    assert refused({"model": {"cache": {"existingClaim": "models", "pvcStorage": {"enabled": True}}}})


def test_ingress_and_httproute_reach_the_gateway_http_port() -> None:
    objs = objects("keda-secure")
    gw_svc = next(s for s in by_kind(objs, "Service").values() if component_of(s) == "gateway")
    (ing,) = by_kind(objs, "Ingress").values()
    (rule,) = ing["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert rule["host"] == "mmpipe.example.com" and ing["spec"]["ingressClassName"] == "nginx"
    assert backend["name"] == gw_svc["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in gw_svc["spec"]["ports"]} and backend["port"]["name"] == "http"
    (route,) = by_kind(objs, "HTTPRoute").values()
    (ref,) = route["spec"]["rules"][0]["backendRefs"]
    http = next(p for p in gw_svc["spec"]["ports"] if p["name"] == "http")
    assert (ref["name"], ref["port"]) == (gw_svc["metadata"]["name"], http["port"])
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateway-system"}]
    assert refused({"gateway": {"httpRoute": {"enabled": True}}})  # a route attached to nothing


def test_valkey_with_an_exporter() -> None:
    objs = objects("keda-secure")
    (sts,) = by_kind(objs, "StatefulSet").values()
    cs = {c["name"]: c for c in sts["spec"]["template"]["spec"]["containers"]}
    assert cs["redis"]["image"].startswith("docker.io/valkey/valkey:")
    assert "exec valkey-server /etc/redis/redis.conf" in cs["redis"]["command"][-1]
    assert cs["redis"]["readinessProbe"]["exec"]["command"][0] == "valkey-cli"
    exp = cs["exporter"]
    assert exp["image"].startswith("docker.io/oliver006/redis_exporter:")
    env = resolved_env(objs, exp)
    assert env["REDIS_PASSWORD"] == resolved_env(objs, cs["redis"])["REDIS_PASSWORD"]
    assert env["REDIS_ADDR"] == f"redis://127.0.0.1:{container_port(cs['redis'], 'redis')}"
    svc = service_for_host(objs, sts["metadata"]["name"])
    metrics = next(p for p in svc["spec"]["ports"] if p["name"] == "metrics")
    assert container_port(exp, metrics["targetPort"]) == metrics["port"]
    # the default stays Redis, no exporter
    (sts,) = by_kind(objects("default"), "StatefulSet").values()
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "docker.io/library/redis:7.4-alpine"


def test_external_redis_cluster_url_is_accepted() -> None:
    url = "redis+cluster://redis-0.redis:6379,redis-1.redis:6379"
    objs = render({"redis": {"enabled": False, "externalUrl": url}})
    for comp in ("gateway", "encoder", "generator"):
        assert env_of(container(deployments(objs)[comp]))["MMPIPE_REDIS_URL"]["value"] == url


def test_helm_test_hook_sends_one_request_to_the_gateway() -> None:
    for rendering in ("default", "keda-secure"):
        objs = objects(rendering)
        (pod,) = [o for o in objs if o["kind"] == "Pod"]
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert pod["spec"]["restartPolicy"] == "Never"
        c = pod["spec"]["containers"][0]
        compile(c["args"][0], "helm-test", "exec")  # the script is valid Python
        env = resolved_env(objs, c)
        gw = container(deployments(objs)["gateway"])
        gw_env = resolved_env(objs, gw)
        m = re.fullmatch(r"http://([^:/]+):(\d+)/v1/chat/completions", env["URL"])
        assert m, env["URL"]
        svc = service_for_host(objs, m[1])
        assert component_of(svc) == "gateway"
        port = next(p for p in svc["spec"]["ports"] if p["port"] == int(m[2]))
        assert container_port(gw, port["targetPort"]) == int(m[2])
        served = gw_env.get("MMPIPE_SERVED_MODEL_NAME", gw_env["MMPIPE_MODEL"]).split()[0]
        assert env["MODEL"] == served  # a name the gateway answers to
        ref = env_of(c)["API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == env_of(gw)["MMPIPE_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert not [o for o in render({"tests": {"enabled": False}}) if o["kind"] == "Pod"]
