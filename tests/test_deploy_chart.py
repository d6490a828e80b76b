"""The Helm chart (charts/mmpipe), offline: lint, render with every CI values file, validate every manifest
against the Kubernetes 1.30 schemas (strict), check the values schema, and check the rendered objects: GPUs only
where asked, probes on the right ports, Secrets wired in, every address the services use resolving to a rendered
Service, and the services' own CLI parsers accepting the environment the chart gives them.

Tools (pyproject `test` extra): helm-python-sdk (Helm v4 in-process: lint, render, schema), kubernetes-validate.
No cluster, no helm binary, no network.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[deploy-check]')")
kv_utils = pytest.importorskip("kubernetes_validate.utils",
                               reason="kubernetes-validate is not installed (pip install -e '.[deploy-check]')")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "mmpipe"
K8S_VERSION = "1.30.0"
RELEASE, NAMESPACE = "demo", "mmpipe"
COMPONENTS = ("gateway", "ingest", "encoder", "generator")
STAGES = ("ingest", "encoder", "generator")
# Kinds whose schemas are CRDs, unknown to kubernetes-validate: checked structurally below instead.
CRD_KINDS = {"ServiceMonitor": "monitoring.coreos.com/v1", "ScaledObject": "keda.sh/v1alpha1",
             "HTTPRoute": "gateway.networking.k8s.io/v1"}

# values file -> the services that must get GPUs in that rendering
RENDERINGS: dict[str, set[str]] = {
    "default": {"encoder", "generator"},
    "cpu-only": set(),
    "one-gpu": {"generator"},
    "multi-replica-autoscaling": {"encoder", "generator"},
    "keda-secure": {"encoder", "generator"},
}


# --- rendering -------------------------------------------------------------------------------------------------
def values_for(name: str) -> dict[str, Any]:
    if name == "default":
        return {}
    if name.startswith("variant:"):
        return VARIANTS[name.removeprefix("variant:")]
    return yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text()) or {}


@lru_cache(maxsize=None)
def _render(name: str) -> tuple[tuple[str, str], ...]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values_for(name), name=RELEASE, namespace=NAMESPACE, is_install=True)
    return tuple(sorted(out.items()))


def rendered_yaml(name: str) -> str:
    """All manifests of one rendering as one multi-document YAML stream (NOTES.txt left out)."""
    return "".join(f"---\n# Source: {path}\n{text}\n" for path, text in _render(name)
                   if text.strip() and not path.endswith("NOTES.txt"))


def notes(name: str) -> str:
    return next(text for path, text in _render(name) if path.endswith("NOTES.txt"))


@lru_cache(maxsize=None)
def _objects(name: str) -> tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all(rendered_yaml(name)) if d)


def objects(name: str) -> list[dict]:
    return json.loads(json.dumps(_objects(name)))  # a deep copy: tests may not disturb each other


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def component_of(obj: dict) -> str | None:
    labels = obj["spec"]["template"]["metadata"]["labels"] if "template" in obj.get("spec", {}) \
        else obj["metadata"].get("labels", {})
    return labels.get("app.kubernetes.io/component")


def deployments(objs: list[dict]) -> dict[str, dict]:
    """component -> Deployment"""
    return {component_of(d): d for d in by_kind(objs, "Deployment").values()}


def container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def container_port(c: dict, name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        assert any(p["containerPort"] == name_or_number for p in c["ports"]), (c["name"], name_or_number)
        return name_or_number
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name_or_number)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def service_for_host(objs: list[dict], host: str) -> dict:
    """The Service a cluster DNS name <svc>.<ns>.svc.cluster.local (or a bare <svc>) resolves to."""
    parts = host.split(".")
    assert len(parts) == 1 or (parts[1] == NAMESPACE and parts[2:] == ["svc", "cluster", "local"]), host
    services = by_kind(objs, "Service")
    assert parts[0] in services, f"{host}: no rendered Service {parts[0]!r} (have {sorted(services)})"
    return services[parts[0]]


def pods_behind(objs: list[dict], svc: dict) -> list[dict]:
    """Workloads (Deployments, StatefulSets) whose pods the Service selects."""
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")
            and selects(svc["spec"].get("selector", {}), o["spec"]["template"]["metadata"]["labels"])]


def expand_env(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of earlier-defined variables."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def secret_value(objs: list[dict], name: str, key: str) -> str | None:
    sec = by_kind(objs, "Secret").get(name)
    if sec is None:
        return None
    return base64.b64decode(sec["data"][key]).decode()


def resolved_env(objs: list[dict], c: dict) -> dict[str, str]:
    """The container's environment as the process sees it (secrets read from rendered Secrets, $(VAR) expanded);
    secrets the chart does not create (existingSecret) get a placeholder."""
    out: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = expand_env(str(e["value"]), out)
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = secret_value(objs, ref["name"], ref["key"]) or f"<{ref['name']}/{ref['key']}>"
    return out


ALL = pytest.mark.parametrize("rendering", list(RENDERINGS))


# --- lint, schema validation of the manifests -------------------------------------------------------------------
@ALL
def test_helm_lint_is_clean(rendering: str) -> None:
    report = helm.lint(str(CHART), values_for(rendering), strict=True, kube_version=f"v{K8S_VERSION}",
                       namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert not problems and not report["errors"], (problems, report["errors"])


@ALL
def test_every_manifest_validates_against_kubernetes_1_30_strict(rendering: str) -> None:
    objs = objects(rendering)
    assert objs, "nothing rendered"
    for obj in objs:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CRD_KINDS:
            assert obj["apiVersion"] == CRD_KINDS[obj["kind"]], name
            with pytest.raises(kv_utils.SchemaNotFoundError):  # if it learns the CRD one day, validate it
                kv_utils.validate(obj, K8S_VERSION, strict=True)
            continue
        try:
            kv_utils.validate(obj, K8S_VERSION, strict=True)
        except kv_utils.ValidationError as e:
            pytest.fail(f"{rendering}: {name} is invalid at {'.'.join(map(str, e.path))}: {e.message}")
        assert obj["metadata"].get("namespace") in (None, NAMESPACE), name


def test_kubernetes_validate_cli_passes_on_all_renderings(tmp_path: Path) -> None:
    """The command CI documents (docs/deploy.md): `kubernetes-validate --strict -k 1.30.0 rendered.yaml`."""
    files = []
    for rendering in RENDERINGS:
        f = tmp_path / f"{rendering}.yaml"
        f.write_text(rendered_yaml(rendering))
        files.append(str(f))
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", K8S_VERSION,
                           *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the only warnings allowed are the CRDs it has no schema for
    warnings = [ln for ln in proc.stdout.splitlines() if ln.startswith("WARN")]
    assert all(any(kind in w for kind in CRD_KINDS) for w in warnings), warnings


def test_kubernetes_validate_catches_a_broken_manifest() -> None:
    """A negative control: the validator really rejects what the strict 1.30 schema forbids."""
    dep = deployments(objects("default"))["encoder"]
    container(dep)["livenessProbe"]["grpc"]["portt"] = 1
    with pytest.raises(kv_utils.ValidationError):
        kv_utils.validate(dep, K8S_VERSION, strict=True)


# --- the values schema --------------------------------------------------------------------------------------------
@ALL
def test_values_files_pass_the_schema(rendering: str) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values_for(rendering))


BAD_VALUES = {
    "negative replicas": {"generator": {"replicas": -1}},
    "missing image repository": {"image": {"repository": ""}},
    "null image repository": {"image": {"repository": None}},
    "empty per-service repository": {"encoder": {"image": {"repository": ""}}},
    "unknown gpu vendor resource": {"encoder": {"gpu": {"count": 1, "resource": "amd.com/gpu"}}},
    "unknown key in the gpu block": {"generator": {"gpu": {"count": 1, "vendor": "amd"}}},
    "gpu key in resources": {"generator": {"resources": {"limits": {"nvidia.com/gpu": 1}}}},
    "other vendor gpu key in resources": {"encoder": {"resources": {"limits": {"gpu.intel.com/i915": 1}}}},
    "negative gpu count": {"encoder": {"gpu": {"count": -1, "resource": "nvidia.com/gpu"}}},
    "unknown top-level key": {"replicaCount": 3},
    "unknown service key": {"gateway": {"replica": 2}},
    "noeviction policy": {"redis": {"maxmemoryPolicy": "noeviction"}},
    "bad maxmemory": {"redis": {"maxmemory": "lots"}},
    "port out of range": {"gateway": {"httpPort": 70000}},
    "hpa min below 1": {"gateway": {"autoscaling": {"enabled": True, "minReplicas": 0}}},
    "unknown tiny family": {"model": {"tiny": {"enabled": True, "family": "gpt2"}}},
    "url-unsafe redis password": {"redis": {"auth": {"enabled": True, "password": "p@ss/word"}}},
    "bad external redis url": {"redis": {"enabled": False, "externalUrl": "http://redis:6379"}},
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_schema_rejects_bad_values(case: str) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(BAD_VALUES[case])
        with pytest.raises(helm.HelmValuesError):  # and `helm install/template` refuses them too
            chart.render(BAD_VALUES[case], name=RELEASE, namespace=NAMESPACE)


def test_committed_generated_files_are_fresh() -> None:
    """values.schema.json and the dashboard are generated by charts/mmpipe/hack/*.py; regenerate after edits."""
    for script, target in (("values_schema.py", "values.schema.json"), ("dashboard.py", "dashboards/mmpipe.json")):
        out = subprocess.run([sys.executable, str(CHART / "hack" / script)], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        assert json.loads(out) == json.loads((CHART / target).read_text()), (
            f"{target} is stale: python charts/mmpipe/hack/{script} > charts/mmpipe/{target}")


# --- GPUs and placement ---------------------------------------------------------------------------------------
@ALL
def test_gpus_only_where_asked_and_gpu_placement_only_on_gpu_pods(rendering: str) -> None:
    objs = objects(rendering)
    gpu_nodes = yaml.safe_load((CHART / "values.yaml").read_text())["gpuNodes"]
    deps = deployments(objs)
    assert set(deps) == set(COMPONENTS)
    for comp, dep in deps.items():
        pod = dep["spec"]["template"]["spec"]
        c = container(dep)
        limits = c.get("resources", {}).get("limits", {})
        requests = c.get("resources", {}).get("requests", {})
        gpu_keys = [k for k in [*limits, *requests] if "gpu" in k or "/mig-" in k]
        env = env_of(c)
        if comp in RENDERINGS[rendering]:
            assert int(limits.get("nvidia.com/gpu", 0)) >= 1, (comp, limits)
            assert c["image"].endswith("-cuda"), c["image"]
            assert env["MMPIPE_DEVICE"]["value"] == "cuda"
            for k, v in gpu_nodes["nodeSelector"].items():
                assert pod["nodeSelector"][k] == v, comp
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no spare GPU needed to roll
        else:
            assert not gpu_keys, (comp, limits, requests)
            assert "nodeSelector" not in pod and "tolerations" not in pod and "affinity" not in pod, comp
            if comp in ("encoder", "generator"):
                assert env["MMPIPE_DEVICE"]["value"] == "cpu"
    # Redis never lands on GPU nodes either
    for sts in by_kind(objs, "StatefulSet").values():
        assert "tolerations" not in sts["spec"]["template"]["spec"]


def test_gpu_affinity_from_values_reaches_gpu_pods_only() -> None:
    deps = deployments(objects("multi-replica-autoscaling"))
    for comp in ("encoder", "generator"):
        pod = deps[comp]["spec"]["template"]["spec"]
        assert "podAntiAffinity" in pod["affinity"]
        assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert int(container(deps["generator"])["resources"]["limits"]["nvidia.com/gpu"]) == 2
    for comp in ("gateway", "ingest"):
        assert "affinity" not in deps[comp]["spec"]["template"]["spec"]


# --- probes and ports -------------------------------------------------------------------------------------------
@ALL
def test_probes_use_grpc_health_on_the_grpc_port_and_http_health_on_the_gateway(rendering: str) -> None:
    objs = objects(rendering)
    for comp, dep in deployments(objs).items():
        c = container(dep)
        env = env_of(c)
        probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
        grpc_port = container_port(c, "grpc")
        if comp == "gateway":
            http_port = container_port(c, "http")
            assert env["MMPIPE_PORT"]["value"] == str(http_port)
            assert env["MMPIPE_GRPC_PORT"]["value"] == str(grpc_port)
            assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
            assert container_port(c, probes["readinessProbe"]["httpGet"]["port"]) == http_port
            # liveness must not follow the stages' health (the gateway's /health and gRPC health both do)
            assert container_port(c, probes["livenessProbe"]["tcpSocket"]["port"]) == http_port
        elif "MMPIPE_TLS_CERT_FILE" in env:  # gRPC TLS: kubelet's grpc probe is plaintext-only
            assert env["MMPIPE_PORT"]["value"] == str(grpc_port)
            for kind, probe in probes.items():
                # docker/healthcheck.py checks 127.0.0.1:$MMPIPE_PORT over TLS, naming the Service's host
                cmd = probe["exec"]["command"]
                assert cmd[-2:] == ["python", "/opt/mmpipe/healthcheck.py"], (comp, kind, cmd)
                host = cmd[1].removeprefix("MMPIPE_STAGE_TLS_SERVER_NAME=")
                assert pods_behind(objs, service_for_host(objs, host)) == [dep], (comp, host)
        else:
            assert env["MMPIPE_PORT"]["value"] == str(grpc_port)
            for kind, probe in probes.items():
                assert probe["grpc"]["port"] == grpc_port, (comp, kind)
                assert probe["grpc"].get("service", "") == "", (comp, kind)  # the server-wide status
            assert env["MMPIPE_METRICS_PORT"]["value"] == str(container_port(c, "metrics"))
        # a slow model load must not be killed by liveness: the startup window covers it
        start = probes["startupProbe"]
        assert start["periodSeconds"] * start["failureThreshold"] >= 300, comp


# --- secrets -----------------------------------------------------------------------------------------------------
@ALL
def test_api_key_secret_is_wired_into_the_gateway_only(rendering: str) -> None:
    objs = objects(rendering)
    values = values_for(rendering)
    deps = deployments(objs)
    ref = env_of(container(deps["gateway"]))["MMPIPE_API_KEY"]["valueFrom"]["secretKeyRef"]
    existing = values.get("apiKey", {}).get("existingSecret")
    if existing:
        assert ref == {"name": existing, "key": values["apiKey"]["secretKey"]}
        assert existing not in by_kind(objs, "Secret")  # the chart must not overwrite a user's Secret
    else:
        key = secret_value(objs, ref["name"], ref["key"])
        assert key and len(key) >= 8, "the API key Secret is missing or empty"
        if values.get("apiKey", {}).get("value"):
            assert key == values["apiKey"]["value"]
    for comp in STAGES:
        assert "MMPIPE_API_KEY" not in env_of(container(deps[comp])), comp
    # nothing secret in plain values or argv
    for dep in deps.values():
        c = container(dep)
        assert all(not re.search(r"password|api.?key", a, re.I) for a in c.get("args", []))
        for e in c.get("env", []):
            if re.search(r"PASSWORD|API_KEY|TOKEN", e["name"]):
                assert "valueFrom" in e, e["name"]


def test_api_key_can_be_turned_off() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render({"apiKey": {"enabled": False}}, name=RELEASE, namespace=NAMESPACE)
    objs = [d for p, t in out.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    assert "MMPIPE_API_KEY" not in env_of(container(deployments(objs)["gateway"]))
    assert not any(n.endswith("-api-key") for n in by_kind(objs, "Secret"))


# --- Redis ------------------------------------------------------------------------------------------------------
@ALL
def test_redis_is_reachable_by_the_url_the_services_use(rendering: str) -> None:
    objs = objects(rendering)
    deps = deployments(objs)
    (sts,) = by_kind(objs, "StatefulSet").values()
    redis_c = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "redis")
    redis_env = resolved_env(objs, redis_c)
    for comp in ("gateway", "encoder", "generator"):
        c = container(deps[comp])
        names = [e["name"] for e in c["env"]]
        assert names.index("REDIS_PASSWORD") < names.index("MMPIPE_REDIS_URL"), "$(REDIS_PASSWORD) needs it first"
        url = resolved_env(objs, c)["MMPIPE_REDIS_URL"]
        m = re.fullmatch(r"redis://:(?P<pw>[^@]+)@(?P<host>[^:/]+):(?P<port>\d+)/(?P<db>\d+)", url)
        assert m, url
        assert m["pw"] == redis_env["REDIS_PASSWORD"], "services and Redis read different passwords"
        svc = service_for_host(objs, m["host"])
        assert [w["metadata"]["name"] for w in pods_behind(objs, svc)] == [sts["metadata"]["name"]]
        port = next(p for p in svc["spec"]["ports"] if p["port"] == int(m["port"]))
        assert container_port(redis_c, port["targetPort"]) == int(m["port"])
    assert "MMPIPE_REDIS_URL" not in env_of(container(deps["ingest"]))  # ingest never talks to Redis


def test_redis_is_a_bounded_lru_cache_without_persistence_by_default() -> None:
    objs = objects("default")
    (cm,) = [o for o in by_kind(objs, "ConfigMap").values() if "redis.conf" in o["data"]]
    conf = cm["data"]["redis.conf"]
    assert re.search(r"^maxmemory 4gb$", conf, re.M)
    assert re.search(r"^maxmemory-policy allkeys-lru$", conf, re.M)
    assert re.search(r'^save ""$', conf, re.M) and re.search(r"^appendonly no$", conf, re.M)
    (sts,) = by_kind(objs, "StatefulSet").values()
    assert "volumeClaimTemplates" not in sts["spec"]
    c = container(sts)
    assert "requirepass" in " ".join(c["command"]) and "$REDIS_PASSWORD" in " ".join(c["command"])
    # the memory limit leaves room above maxmemory (fragmentation, buffers)
    assert c["resources"]["limits"]["memory"] == "5Gi"
    # persistence on: a PVC per replica
    (sts,) = by_kind(objects("multi-replica-autoscaling"), "StatefulSet").values()
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "64Gi"


def test_external_redis_url_from_a_secret() -> None:
    values = {"redis": {"enabled": False, "externalUrlSecret": {"name": "my-redis", "key": "url"}}}
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objs = [d for p, t in out.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    assert not by_kind(objs, "StatefulSet")
    for comp in ("gateway", "encoder", "generator"):
        env = env_of(container(deployments(objs)[comp]))
        assert env["MMPIPE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "url"}


# --- stage addresses ----------------------------------------------------------------------------------------------
@ALL
def test_stage_addresses_resolve_to_headless_services_of_the_right_pods(rendering: str) -> None:
    objs = objects(rendering)
    deps = deployments(objs)
    wiring = [("gateway", "MMPIPE_INGEST_ADDR", "ingest"), ("gateway", "MMPIPE_ENCODER_ADDR", "encoder"),
              ("gateway", "MMPIPE_GENERATOR_ADDR", "generator"), ("ingest", "MMPIPE_ENCODER_ADDR", "encoder")]
    for client, var, target in wiring:
        addr = env_of(container(deps[client]))[var]["value"]
        m = re.fullmatch(r"dns:///(?P<host>[^:]+):(?P<port>\d+)", addr)
        assert m, f"{client} {var}={addr}: use dns:/// so gRPC's round_robin sees every replica"
        svc = service_for_host(objs, m["host"])
        assert svc["spec"].get("clusterIP") == "None", f"{svc['metadata']['name']} must be headless"
        assert pods_behind(objs, svc) == [deps[target]], (client, var)
        port = next(p for p in svc["spec"]["ports"] if p["port"] == int(m["port"]))
        assert container_port(container(deps[target]), port["targetPort"]) == int(m["port"])


@ALL
def test_gateway_service_exposes_http_grpc_and_metrics(rendering: str) -> None:
    objs = objects(rendering)
    deps = deployments(objs)
    services = {component_of(s): s for s in by_kind(objs, "Service").values() if component_of(s) in COMPONENTS}
    assert set(services) == set(COMPONENTS)
    gw = services["gateway"]
    assert gw["spec"].get("clusterIP") != "None"
    ports = {p["name"]: p for p in gw["spec"]["ports"]}
    assert set(ports) == {"http", "grpc", "metrics"}
    c = container(deps["gateway"])
    assert container_port(c, ports["metrics"]["targetPort"]) == container_port(c, "http")  # /metrics on HTTP
    for comp in STAGES:
        names = {p["name"] for p in services[comp]["spec"]["ports"]}
        assert names == {"grpc", "metrics"}


# --- autoscaling, disruption budgets, monitoring --------------------------------------------------------------------
@ALL
def test_hpas_target_rendered_deployments(rendering: str) -> None:
    objs = objects(rendering)
    deps = by_kind(objs, "Deployment")
    hpas = by_kind(objs, "HorizontalPodAutoscaler")
    values = values_for(rendering)
    expected = {c for c in COMPONENTS if values.get(c, {}).get("autoscaling", {}).get("enabled")}
    keda = values.get("keda", {}).get("enabled", False)  # KEDA builds the HPAs from the ScaledObjects
    assert {component_of(h) for h in hpas.values()} == (set() if keda else expected)
    assert {component_of(o) for o in by_kind(objs, "ScaledObject").values()} == (expected if keda else set())
    for hpa in hpas.values():
        assert hpa["apiVersion"] == "autoscaling/v2"
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deps, ref
        assert "replicas" not in deps[ref["name"]]["spec"], "the HPA owns replicas; the chart must not reset them"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert hpa["spec"]["metrics"], hpa["metadata"]["name"]
    for name, dep in deps.items():
        if component_of(dep) not in expected:
            assert dep["spec"]["replicas"] >= 1, name


@ALL
def test_pdbs_select_their_deployments(rendering: str) -> None:
    objs = objects(rendering)
    deps = deployments(objs)
    for pdb in by_kind(objs, "PodDisruptionBudget").values():
        comp = component_of(pdb)
        assert selects(pdb["spec"]["selector"]["matchLabels"], deps[comp]["spec"]["template"]["metadata"]["labels"])
    expected = {"default": 4, "cpu-only": 0, "one-gpu": 4, "multi-replica-autoscaling": 4, "keda-secure": 4}[rendering]
    assert len(by_kind(objs, "PodDisruptionBudget")) == expected


@ALL
def test_servicemonitor_only_when_enabled_and_it_scrapes_every_service(rendering: str) -> None:
    objs = objects(rendering)
    enabled = values_for(rendering).get("metrics", {}).get("serviceMonitor", {}).get("enabled", False)
    monitors = by_kind(objs, "ServiceMonitor")
    assert bool(monitors) == enabled
    for sm in monitors.values():
        selector = sm["spec"]["selector"]["matchLabels"]
        scraped = [s for s in by_kind(objs, "Service").values() if selects(selector, s["metadata"]["labels"])]
        assert {component_of(s) for s in scraped} == set(COMPONENTS)
        (endpoint,) = sm["spec"]["endpoints"]
        assert all(any(p["name"] == endpoint["port"] for p in s["spec"]["ports"]) for s in scraped)
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


@ALL
def test_grafana_dashboard_configmap_covers_the_key_signals(rendering: str) -> None:
    objs = objects(rendering)
    enabled = values_for(rendering).get("metrics", {}).get("grafanaDashboard", {}).get("enabled", False)
    dashboards = [o for o in by_kind(objs, "ConfigMap").values() if o["metadata"]["labels"].get("grafana_dashboard")]
    assert len(dashboards) == int(enabled)
    if not enabled:
        return
    board = json.loads(dashboards[0]["data"]["mmpipe.json"])
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    for metric in ("mmpipe_gateway_time_to_first_token_seconds_bucket",
                   "mmpipe_gateway_time_per_output_token_seconds_bucket", "mmpipe_gateway_generation_tokens_total",
                   "mmpipe_gateway_requests_total", "mmpipe_gateway_mm_cache_hits_total",
                   "mmpipe_gateway_mm_cache_misses_total", "mmpipe_encoder_queue_depth",
                   "mmpipe_generator_engine_waiting_requests", "mmpipe_encoder_batch_size_bucket",
                   "mmpipe_generator_engine_running_requests", "mmpipe_generator_engine_kv_cache_usage_ratio",
                   "mmpipe_generator_engine_steps_total", "mmpipe_generator_engine_preemptions_total",
                   *(f"mmpipe_{stage}_step_duration_seconds_bucket" for stage in
                     ("gateway", "ingest", "encoder", "generator")), "mmpipe_encoder_encode_duration_seconds_bucket",
                   "mmpipe_generator_prefix_cache_hits_tokens_total", "mmpipe_generator_prefix_cache_cached_blocks",
                   "DCGM_FI_DEV_FB_USED"):
        assert metric in exprs, metric


def test_dashboard_metric_names_exist_in_the_services() -> None:
    """Every mmpipe_* series the dashboard queries is defined by some service (catches renames)."""
    board = json.loads((CHART / "dashboards" / "mmpipe.json").read_text())
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p.get("targets", []))
    used = {re.sub(r"_(bucket|sum|count|total)$", "", m) for m in re.findall(r"mmpipe_[a-z0-9_]+", exprs)}
    source = "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    defined = set(re.findall(r'"(mmpipe_[a-z0-9_]+)"', source))
    for m in re.finditer(r'\.(?:counter|gauge|histogram)\(\s*"([a-z0-9_]+)"', source):
        defined.update(f"mmpipe_{svc}_{m.group(1)}" for svc in ("ingest", "encoder", "generator"))
    for m in re.finditer(r'f"\{p\}_([a-z0-9_]+)"', source):  # ServiceMetrics' per-service base metrics
        defined.update(f"mmpipe_{svc}_{m.group(1)}" for svc in ("ingest", "encoder", "generator"))
    assert not used - defined, sorted(used - defined)


# --- tiny model, security, notes --------------------------------------------------------------------------------------
def test_cpu_only_rendering_builds_and_serves_the_tiny_model() -> None:
    deps = deployments(objects("cpu-only"))
    for comp, dep in deps.items():
        pod = dep["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert "mmpipe tiny-model qwen2_5_omni /models/tiny" in init["command"][-1]
        assert env_of(container(dep))["MMPIPE_MODEL"]["value"] == "/models/tiny"
        assert container(dep)["image"].endswith("-cpu"), comp


@ALL
def test_pods_run_as_non_root_with_a_read_only_root(rendering: str) -> None:
    objs = objects(rendering)
    for w in [*by_kind(objs, "Deployment").values(), *by_kind(objs, "StatefulSet").values()]:
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), c["name"]


def test_notes_tell_how_to_reach_the_api() -> None:
    text = notes("default")
    assert "port-forward svc/demo-mmpipe-gateway 8000:8000" in text
    assert "/v1/chat/completions" in text and "demo-mmpipe-api-key" in text


# --- the services accept what the chart gives them ----------------------------------------------------------------
def _option_env_names(parser) -> dict[str, str]:
    """MMPIPE_<FLAG> -> argparse dest, for every --flag of a service's parser (the project's naming rule)."""
    out = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                out["MMPIPE_" + opt[2:].upper().replace("-", "_")] = action.dest
    return out


# Variables the services read outside their argparse flags (shared/ modules, third-party libraries).
NON_FLAG_ENV = {"MMPIPE_CACHE_DIR", "MMPIPE_MEDIA_FETCH_TIMEOUT", "MMPIPE_MEDIA_MAX_BYTES",
                "MMPIPE_MEDIA_URL_ALLOW_REDIRECTS"}


@pytest.mark.parametrize("rendering", ["default", "multi-replica-autoscaling", "keda-secure", "variant:everything on"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_service_cli_parses_the_rendered_environment(rendering: str, component: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Build `mmpipe <component>`'s real parser under the container's environment: every MMPIPE_* variable the
    chart sets must be one the service reads, and must arrive with the intended value."""
    import argparse

    from mmpipe import cli

    assert component in cli.SUBCOMMANDS, f"`mmpipe {component}` is not registered in mmpipe/cli.py"
    objs = objects(rendering)
    env = resolved_env(objs, container(deployments(objs)[component]))
    for name in [k for k in os.environ if k.startswith("MMPIPE_")]:
        monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    parser = cli.build_parser({component: cli.SUBCOMMANDS[component]})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[component]
    known = _option_env_names(sub)
    unread = sorted(k for k in env if k.startswith("MMPIPE_") and k not in known and k not in NON_FLAG_ENV)
    assert not unread, f"the chart sets {unread} but `mmpipe {component}` has no such flag"
    args = parser.parse_args([component])
    for var, value in env.items():
        if var not in known:
            continue
        got = getattr(args, known[var])
        if isinstance(got, bool):
            assert got is (value.lower() in ("1", "true", "yes", "on")), var
        elif isinstance(got, (list, tuple)):
            # list flags (allowed media domains, served model names): every item arrives separately
            assert [str(x) for x in got] == re.split(r"[ ,]+", value), (var, got, value)
        elif isinstance(got, dict):
            assert got == json.loads(value), var
        else:
            assert str(got) == value, (var, got, value)


def test_names_used_in_the_docs_walkthrough() -> None:
    """docs/deploy.md and the README install release "mmpipe" and port-forward svc/mmpipe-gateway."""
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render({"apiKey": {"existingSecret": "mmpipe-api-key"}}, name="mmpipe", namespace="mmpipe")
    objs = [d for p, t in out.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    assert "mmpipe-gateway" in by_kind(objs, "Service")
    text = next(t for p, t in out.items() if p.endswith("NOTES.txt"))
    assert "port-forward svc/mmpipe-gateway 8000:8000" in text and "secret mmpipe-api-key" in text
    for doc in ("docs/deploy.md", "README.md"):
        assert "port-forward svc/mmpipe-gateway 8000:8000" in (ROOT / doc).read_text(), doc


VARIANTS = {
    "redis without auth": {"redis": {"auth": {"enabled": False}}},
    "external redis url": {"redis": {"enabled": False, "externalUrl": "rediss://:pw@redis.example.com:6380/2"}},
    "redis persistence": {"redis": {"persistence": {"enabled": True, "storageClass": "fast"}}},
    "mig slices": {"encoder": {"gpu": {"count": 1, "resource": "nvidia.com/mig-3g.40gb"}}},
    "everything on": {"metrics": {"serviceMonitor": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
                      "multimodal": {"enableMmEmbeds": True, "allowedLocalMediaPath": "/media"},
                      "model": {"maxModelLen": 8192, "servedModelName": "qwen", "hfTokenSecret": "hf"},
                      "imagePullSecrets": [{"name": "regcred"}], "gateway": {"service": {"type": "LoadBalancer"}}},
    "everything off": {"apiKey": {"enabled": False}, "serviceAccount": {"create": False},
                       **{c: {"pdb": {"enabled": False}} for c in COMPONENTS}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_value_variants_render_valid_manifests(variant: str) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(VARIANTS[variant], name=RELEASE, namespace=NAMESPACE)
    objs = [d for p, t in out.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    for obj in objs:
        if obj["kind"] not in CRD_KINDS:
            kv_utils.validate(obj, K8S_VERSION, strict=True)
    deps = deployments(objs)
    if variant == "mig slices":
        assert int(container(deps["encoder"])["resources"]["limits"]["nvidia.com/mig-3g.40gb"]) == 1
    if variant == "external redis url":
        assert not by_kind(objs, "StatefulSet")
        assert env_of(container(deps["generator"]))["MMPIPE_REDIS_URL"]["value"].startswith("rediss://")
    if variant == "redis without auth":
        assert env_of(container(deps["encoder"]))["MMPIPE_REDIS_URL"]["value"].startswith("redis://demo-mmpipe-redis.")
