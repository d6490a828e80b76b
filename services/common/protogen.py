"""Generate the Python gRPC stubs of `proto/mmpipe/v1/*.proto` into ONE package (`services/common/pb`).

    python -m mmpipe.services.common.protogen            # regenerate services/common/pb in place
    python -m mmpipe.services.common.protogen --check    # regenerate into a temp dir and diff (exit 1 if stale)

protoc writes `from mmpipe.v1 import common_pb2` (a top-level import that would shadow our own `mmpipe`
package); the generated files are flattened into the pb folder and those imports rewritten to
`from mmpipe.services.common.pb import common_pb2`. Never edit the generated files by hand.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_DIR = PROTO_ROOT / "mmpipe" / "v1"
PB_DIR = Path(__file__).resolve().parent / "pb"
PB_PACKAGE = "mmpipe.services.common.pb"
_IMPORT = re.compile(r"^from mmpipe\.v1 import (\w+_pb2)", re.M)
_INIT = '"""Generated protobuf / gRPC stubs of proto/mmpipe/v1 (`make proto`). Do not edit."""\n'


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every proto of the package into `out_dir` (flat); returns the files written."""
    from grpc_tools import protoc  # local: only `make proto` and the staleness test need grpc_tools

    import grpc_tools

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(grpc_tools.__file__).parent / "_proto"
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *[str(p.relative_to(PROTO_ROOT)) for p in protos]]
        rc = protoc.main(args)
        if rc != 0:
            raise SystemExit(f"protoc failed with exit status {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((Path(tmp) / "mmpipe" / "v1").iterdir()):
            text = _IMPORT.sub(rf"from {PB_PACKAGE} import \1", f.read_text())
            dst = out_dir / f.name
            dst.write_text(text)
            written.append(dst)
        (out_dir / "__init__.py").write_text(_INIT)
        return written + [out_dir / "__init__.py"]


def diff(a: Path, b: Path) -> list[str]:
    """Unified diff lines between the generated files of two folders (empty when identical)."""
    out: list[str] = []
    names = sorted({p.name for p in a.glob("*.py*")} | {p.name for p in b.glob("*.py*")})
    for n in names:
        ta = (a / n).read_text().splitlines(keepends=True) if (a / n).exists() else []
        tb = (b / n).read_text().splitlines(keepends=True) if (b / n).exists() else []
        out += list(difflib.unified_diff(ta, tb, f"committed/{n}", f"generated/{n}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    ap.add_argument("--out", type=Path, default=PB_DIR, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            d = diff(args.out, Path(tmp))
        if d:
            sys.stdout.writelines(d)
            print("\nstubs are stale: run `make proto`", file=sys.stderr)
            return 1
        print("stubs are up to date")
        return 0
    for f in (args.out.glob("*_pb2*.py*")):
        f.unlink()  # drop stubs of protos that were removed
    files = generate(args.out)
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
