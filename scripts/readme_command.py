"""Prints the command in the fenced block after `<!-- NAME -->` in README.md (used by .ci/run and tests)."""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_command(name: str, text: str | None = None) -> str:
    text = README.read_text(encoding="utf-8") if text is None else text
    match = re.search(rf"<!-- {re.escape(name)} -->\s*```[a-z]*\n(.*?)\n```", text, re.DOTALL)
    if match is None:
        raise SystemExit(f"README.md has no fenced block after <!-- {name} -->")
    return match.group(1).strip()


if __name__ == "__main__":
    print(readme_command(sys.argv[1]))
