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
    _pip("install", "-e", ".", "--no-deps", "--no-build-isolation", "--prefix", str(prefix), cwd=src)
    site_dir = next(prefix.rglob("site-packages"))
    code = (f"import site; site.addsitedir({str(site_dir)!r}); "
            "import mmpipe.shared.types, mmpipe.services.common.logs, os; "
            "print(os.path.realpath(mmpipe.shared.types.__file__)); "
            "print(os.path.realpath(mmpipe.services.common.logs.__file__))")
    # -S: this interpreter's own .pth files (an editable mmpipe of another checkout among them) are not run
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": _site_packages()}
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(src / "shared" / "types.py"), str(src / "services" / "common" / "logs.py")]
