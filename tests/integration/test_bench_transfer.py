"""benchmarks/bench_transfer.py in quick mode: real servers, well-formed JSON, figures that add up."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_transfer
from benchmarks.report import Settings, headline_row


def test_quick_transfer_benchmark_gives_consistent_json() -> None:
    result = bench_transfer.measure(Settings(model="tiny", quick=True))

    assert json.loads(json.dumps(result)) == result
    for key in ("benchmark", "description", "settings", "paths", "target", "target_met", "headline"):
        assert key in result, key
    assert result["benchmark"] == "transfer"
    tensor = result["settings"]["tensor"]
    tokens = result["settings"]["tokens"]
    assert tensor["shape"] == [tokens, bench_transfer.HIDDEN_SIZE]
    assert tensor["dtype"] == "bfloat16"
    assert tensor["bytes"] == tokens * bench_transfer.HIDDEN_SIZE * 2
    assert result["settings"]["rounds"] == len(result["rounds"]) == 1

    assert set(result["paths"]) == {"upload", "encode"}
    for path, figures in result["paths"].items():
        ours, raw = figures["ours_mb_per_s"]["median"], figures["raw_mb_per_s"]["median"]
        checked = figures["raw_blake3_mb_per_s"]["median"]
        assert ours > 0 and raw > 0 and checked > 0, path
        assert figures["ratio_of_medians"] == pytest.approx(ours / raw)
        assert figures["ratio_to_raw_blake3"] == pytest.approx(ours / checked)
        assert figures["ratio_per_round"] == [
            pytest.approx(row[path]["ours"]["mb_per_s"] / row[path]["raw"]["mb_per_s"])
            for row in result["rounds"]
        ]
        # Throughput is the bytes moved over the wall time of the round's transfers.
        row = result["rounds"][0][path]["ours"]
        transfers = result["settings"]["transfers_per_side_per_round"]
        assert row["mb_per_s"] == pytest.approx(transfers * tensor["bytes"] / row["wall_s"] / 1e6)
        assert figures["target_met"] is (figures["ratio_of_medians"] >= bench_transfer.TARGET_RATIO)
    assert result["target_met"] is all(figures["target_met"] for figures in result["paths"].values())
    assert result["steps_timed_alone"]["blake3_one_side_ms"] > 0
    assert result["steps_timed_alone"]["sha256_one_side_ms"] > 0

    rows = result["headline"]
    assert rows == bench_transfer.headline(result)
    assert [row["metric"].split(", ")[:2] for row in rows] == [
        ["embedding transfer", "upload to the generator"],
        ["embedding transfer", "Encode from the encoder's cache"],
    ]
    contract_keys = set(headline_row("x", "y", unit="z", ours=1.0))
    for row, path in zip(rows, ("upload", "encode"), strict=True):
        assert set(row) == contract_keys
        assert row["benchmark"] == "transfer" and row["unit"] == "MB/s"
        assert row["ours"] == result["paths"][path]["ours_mb_per_s"]["median"]
        assert row["baseline"] == result["paths"][path]["raw_mb_per_s"]["median"]
        assert row["ratio"] == result["paths"][path]["ratio_of_medians"]
        assert row["target_met"] is result["paths"][path]["target_met"]
