"""Single-thread checksum throughput (GB/s) over the buffers that travel: sha256, BLAKE3 and xxh3-128.

Why the wire checks tensors with BLAKE3: it is the fastest of the three that is also collision-resistant,
which an upload's content key needs (a client chooses those bytes). xxh3-128 is faster still but not
collision-resistant; sha256 is what the wire used before. Each hash runs on one thread (BLAKE3's own
multithreading is off) over random bytes: a 1 MiB chunk (what one stream message carries) and a 10 MiB
embedding. The timing of each is the median over `rounds` of `repeats` back-to-back hashes.

    python -m benchmarks.bench_checksum --rounds 20
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from collections.abc import Callable

from benchmarks.report import Settings, headline_row, machine_info, options, standalone, write_json

DEFAULTS = {"rounds": 20, "repeats": 20}
QUICK = {"repeats": 2}
SIZES = {"chunk_1mib": 1 << 20, "embedding_10mib": 10 << 20}
CHOSEN = "blake3"


def hashers() -> dict[str, Callable[[bytes], bytes]]:
    """Each candidate as a one-shot function; xxhash is optional (it is only a point of comparison)."""
    import blake3

    found: dict[str, Callable[[bytes], bytes]] = {
        "sha256": lambda data: hashlib.sha256(data).digest(),
        "blake3": lambda data: blake3.blake3(data).digest(),
    }
    try:
        import xxhash
    except ImportError:
        return found
    found["xxh3_128"] = lambda data: xxhash.xxh3_128(data).digest()
    return found


def time_hash(hash_once: Callable[[bytes], bytes], data: bytes, rounds: int, repeats: int) -> dict:
    hash_once(data)  # warm-up: first-call costs (CPU feature detection, page faults) are not throughput
    per_round = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            hash_once(data)
        per_round.append((time.perf_counter() - started) / repeats)
    median = statistics.median(per_round)
    return {"median_ms": median * 1e3, "min_ms": min(per_round) * 1e3, "gb_per_s": len(data) / median / 1e9}


def measure(settings: Settings, **overrides: object) -> dict:
    """Overrides: `repeats` (hashes per round)."""
    args = options(settings, DEFAULTS, QUICK, overrides)
    if args.repeats < 1:
        raise ValueError("repeats must be >= 1")
    candidates = hashers()
    figures = {
        size_name: {
            name: time_hash(hash_once, os.urandom(size), args.rounds, args.repeats)
            for name, hash_once in candidates.items()
        }
        for size_name, size in SIZES.items()
    }
    result = {
        "benchmark": "checksum",
        "description": "single-thread throughput (GB/s, 1e9 bytes) of the candidate tensor checksums over "
        "random bytes of the sizes that travel",
        "machine": machine_info(),
        "settings": {
            "rounds": args.rounds,
            "repeats_per_round": args.repeats,
            "quick": settings.quick,
            "sizes_bytes": SIZES,
        },
        "collision_resistant": {"sha256": True, "blake3": True, "xxh3_128": False},
        "figures": figures,
        "chosen": CHOSEN,
        "not_measured": [] if "xxh3_128" in candidates else ["checksum: xxh3_128 (pip install xxhash)"],
    }
    result["headline"] = headline(result)
    return result


def headline(result: dict) -> list[dict]:
    embedding = result["figures"]["embedding_10mib"]
    return [
        headline_row(
            "checksum",
            "tensor checksum, 10 MiB, one thread",
            unit="GB/s",
            ours=embedding[CHOSEN]["gb_per_s"],
            baseline=embedding["sha256"]["gb_per_s"],
            baseline_name="sha256 (hashlib), the wire's checksum before BLAKE3",
            ratio=embedding[CHOSEN]["gb_per_s"] / embedding["sha256"]["gb_per_s"],
            ratio_meaning="blake3 / sha256 (higher is better)",
            note="xxh3-128 "
            + (f"{embedding['xxh3_128']['gb_per_s']:.1f} GB/s" if "xxh3_128" in embedding else "not measured")
            + ", not collision-resistant, so not usable for content keys",
        )
    ]


def print_table(result: dict) -> None:
    names = list(next(iter(result["figures"].values())))
    print(f"{'buffer':<16}" + "".join(f"{name + ' GB/s':>16}" for name in names))
    for size_name, row in result["figures"].items():
        print(f"{size_name:<16}" + "".join(f"{row[name]['gb_per_s']:16.2f}" for name in names))


def main() -> None:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--repeats", type=int, default=None, help="hashes per round (20; 2 with --quick)")

    settings, overrides, out = standalone(__doc__, "checksum", flags)
    result = measure(settings, **overrides)
    print_table(result)
    print(f"wrote {write_json(result, out, 'checksum')}")


if __name__ == "__main__":
    main()
