"""The reliability suite records its measurements through `figures`; scripts/reliability_report.py collects
them (it sets ZSPLIT_RELIABILITY_FIGURES) and rewrites the figures in docs/RELIABILITY.md."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FIGURES_ENV = "ZSPLIT_RELIABILITY_FIGURES"


class Figures:
    """Measurements by section: `figures.record("Load", "p99 latency", 0.42, "s")`."""

    def __init__(self) -> None:
        self.sections: dict[str, dict[str, dict[str, Any]]] = {}

    def record(self, section: str, name: str, value: Any, unit: str = "", note: str = "") -> None:
        self.sections.setdefault(section, {})[name] = {"value": value, "unit": unit, "note": note}

    def write(self, path: Path) -> None:
        existing = json.loads(path.read_text()) if path.exists() else {}
        for section, rows in self.sections.items():
            existing.setdefault(section, {}).update(rows)
        path.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    collected = Figures()
    yield collected
    target = os.environ.get(FIGURES_ENV)
    if target:
        collected.write(Path(target))
