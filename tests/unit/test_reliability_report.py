"""scripts/reliability_report.py renders the suite's figures into docs/RELIABILITY.md, between its markers."""

from pathlib import Path

from scripts.reliability_report import BEGIN, DOCUMENT, END, SECTION_ORDER, render, rewrite

REPORT = {
    "measured_at": "2026-11-23 12:00 UTC",
    "machine": "2 CPU cores (test)",
    "suite_seconds": 99,
    "figures": {
        "Load": {"throughput": {"value": 13.2, "unit": "images/s", "note": ""}},
        "Bad input": {"table cases": {"value": 44, "unit": "", "note": "a|b"}},
        "Zeta": {"x": {"value": "1 → 2", "unit": "", "note": ""}},
    },
}


def test_sections_come_in_the_documented_order_with_their_rows() -> None:
    text = render(REPORT)
    assert text.index("### Bad input") < text.index("### Load") < text.index("### Zeta")
    assert "| throughput | 13.2 images/s |" in text
    assert "| table cases | 44 (a\\|b) |" in text  # a pipe in a cell does not break the table
    assert "2 CPU cores (test)" in text and "99 s" in text


def test_rewrite_replaces_only_what_is_between_the_markers() -> None:
    document = f"intro\n{BEGIN}\nold figures\n{END}\noutro\n"
    rewritten = rewrite(document, "new figures")
    assert rewritten == f"intro\n{BEGIN}\nnew figures\n{END}\noutro\n"
    assert rewrite(rewritten, "new figures") == rewritten


def test_the_document_has_generated_figures_for_every_section() -> None:
    document = Path(DOCUMENT).read_text()
    figures = document.split(BEGIN, 1)[1].split(END, 1)[0]
    for section in SECTION_ORDER:
        assert f"### {section}" in figures, f"run `python scripts/reliability_report.py` ({section} missing)"
