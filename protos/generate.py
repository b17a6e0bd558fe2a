"""Generate the Python stubs of the dff.v1 contracts (the only way they are made).

    python protos/generate.py          # regenerate protos/dff_protos/v1/*_pb2*.py
    python protos/generate.py --check  # exit 1 if the committed stubs are stale

The stubs are committed so that installing the project needs no protoc; CI runs --check.
The generator version is pinned in pyproject.toml (extra "dev": grpcio-tools==...).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_DIR = HERE / "dff_protos" / "v1"


def generate(out_root: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # imported here: only needed to generate

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(HERE)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "dff_protos" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if stubs are stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = []
        for path in generated:
            target = PROTO_DIR / path.name
            if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                stale.append(target.name)
                if not args.check:
                    shutil.copyfile(path, target)
        names = {p.name for p in generated}
        extra = [p.name for p in PROTO_DIR.glob("*_pb2*.py*") if p.name not in names]
    if args.check and (stale or extra):
        print(f"stale generated stubs: {stale + extra}; run python protos/generate.py",
              file=sys.stderr)
        return 1
    for name in extra:
        (PROTO_DIR / name).unlink()
    print("stubs up to date" if args.check else f"generated {len(generated)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
