"""The committed generated code must match what scripts/gen_proto.py makes from the .proto files."""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "zimage_split" / "_proto"


def test_generated_code_is_in_sync_with_the_protos(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gen_proto.py", copy / "scripts")
    shutil.copytree(ROOT / "proto", copy / "proto", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "scripts/gen_proto.py"], cwd=copy, check=True)
    made, committed = copy / GENERATED.relative_to(ROOT), GENERATED
    generated = sorted(p.relative_to(made) for p in made.rglob("*") if p.is_file())
    on_main = sorted(
        p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert generated == on_main, "run `python scripts/gen_proto.py` and commit the result"
    stale = [str(p) for p in generated if not filecmp.cmp(made / p, committed / p, shallow=False)]
    assert not stale, f"generated code is out of date: {stale}; run `python scripts/gen_proto.py`"


def test_nothing_generated_sits_beside_the_protos_or_at_top_level() -> None:
    strays = [str(p) for p in (ROOT / "proto").rglob("*") if p.is_file() and p.suffix != ".proto"]
    assert not strays, f"proto/ holds only .proto files; generated code goes to {GENERATED}: {strays}"
    generated = (GENERATED / "encoder" / "v1" / "encoder_pb2.py").read_text()
    assert "\nfrom zimage." not in generated and "from zimage_split._proto.tensor.v1 import" in generated


def test_every_rpc_message_and_field_is_commented() -> None:
    import re

    declaration = re.compile(
        r"^\s*(rpc |message |enum |service |(optional |repeated )?[\w.]+ \w+ = \d+;|\w+ = \d+;)"
    )
    missing = []
    for path in (ROOT / "proto").rglob("*.proto"):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if declaration.match(line):
                above = lines[number - 1].strip() if number else ""
                if not above.startswith("//"):
                    missing.append(f"{path.name}:{number + 1}: {line.strip()}")
    assert not missing, "uncommented declarations:\n" + "\n".join(missing)
