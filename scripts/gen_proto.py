"""Regenerates the committed protobuf code in zimage_split/_proto/ from proto/: `python scripts/gen_proto.py`.

protoc writes `from zimage.tensor.v1 import tensor_pb2`, which would need a top-level package `zimage` (a name
PyPI already gives to another project). As TGI does for its `pb` package, the generated modules live inside our
own package and their imports are rewritten here, at generation time. The wire names (`zimage.encoder.v1`, ...)
stay as the .proto files declare them.
"""

import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPOSITORY = Path(__file__).resolve().parent.parent
PROTOS = REPOSITORY / "proto"
TARGET = REPOSITORY / "zimage_split" / "_proto"
PACKAGE = "zimage_split._proto"

# `from zimage.tensor.v1 import tensor_pb2` and the module names protoc gives the builder.
IMPORT = re.compile(r"^from zimage\.", re.MULTILINE)
MODULE_NAME = re.compile(r"'zimage\.(\w+\.v\d+\.\w+_pb2)'")


def rewrite(text: str) -> str:
    text = IMPORT.sub(f"from {PACKAGE}.", text)
    return MODULE_NAME.sub(rf"'{PACKAGE}.\1'", text)


def main() -> int:
    protos = sorted(str(path.relative_to(PROTOS)) for path in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
        ]
        status = protoc.main(args + protos)
        if status:
            return status
        shutil.rmtree(TARGET, ignore_errors=True)
        TARGET.mkdir(parents=True)
        (TARGET / "__init__.py").write_text(
            '"""Generated protobuf code (scripts/gen_proto.py); do not edit."""\n'
        )
        for generated in sorted((out / "zimage").rglob("*_pb2*")):
            destination = TARGET / generated.relative_to(out / "zimage")
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_text(rewrite(generated.read_text()))
        for folder in sorted({path.parent for path in TARGET.rglob("*_pb2*")}):
            while folder != TARGET:
                (folder / "__init__.py").touch()
                folder = folder.parent
    return 0


if __name__ == "__main__":
    sys.exit(main())
