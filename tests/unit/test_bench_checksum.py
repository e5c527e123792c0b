"""benchmarks/bench_checksum.py in quick mode: every candidate timed on both sizes, well-formed JSON."""

import json

import pytest

from benchmarks import bench_checksum
from benchmarks.report import Settings, headline_row


def test_quick_checksum_benchmark_times_every_candidate_on_both_sizes() -> None:
    result = bench_checksum.measure(Settings(model="tiny", quick=True))

    assert json.loads(json.dumps(result)) == result
    assert result["benchmark"] == "checksum" and result["chosen"] == "blake3"
    assert result["settings"]["rounds"] == 1 and result["settings"]["repeats_per_round"] == 2
    assert set(result["figures"]) == set(bench_checksum.SIZES)
    for size_name, row in result["figures"].items():
        assert {"sha256", "blake3", "xxh3_128"} <= set(row), size_name
        for figures in row.values():
            size = bench_checksum.SIZES[size_name]
            assert figures["gb_per_s"] == pytest.approx(size / (figures["median_ms"] / 1e3) / 1e9)
            assert figures["min_ms"] <= figures["median_ms"]
    assert result["collision_resistant"]["blake3"] and not result["collision_resistant"]["xxh3_128"]

    (row,) = result["headline"]
    assert set(row) == set(headline_row("x", "y", unit="z", ours=1.0))
    embedding = result["figures"]["embedding_10mib"]
    assert (
        row["ours"] == embedding["blake3"]["gb_per_s"] and row["baseline"] == embedding["sha256"]["gb_per_s"]
    )
