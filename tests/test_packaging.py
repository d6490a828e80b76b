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
