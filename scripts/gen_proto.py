"""Regenerates the committed Python code in proto/ from the .proto files: `python scripts/gen_proto.py`."""

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent / "proto"


def main() -> int:
    protos = sorted(str(path.relative_to(ROOT)) for path in ROOT.rglob("*.proto"))
    args = ["protoc", f"-I{ROOT}", f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}"]
    status = protoc.main(args + protos)
    # Regular packages, so that `zimage` installs like any other package.
    for folder in {ROOT / "zimage"} | {(ROOT / proto).parent for proto in protos}:
        while folder != ROOT:
            (folder / "__init__.py").touch()
            folder = folder.parent
    return status


if __name__ == "__main__":
    sys.exit(main())
