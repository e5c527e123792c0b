"""Images per second from the generator over Ray Serve CPU replicas: 2 replicas against 1, batch 4 against 1.

Every configuration is its own generator server (Ray started in this process, `address="local"`), fed a
burst of concurrent `AsyncClient.generate` calls with uploaded random embeddings (no encoder service).
Each round starts every configuration afresh, runs one untimed warm-up burst, then one timed burst; the
order within each pair flips every round, and both sides of a pair get the same embeddings and seeds.

    python -m benchmarks.bench_ray --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
from collections import Counter

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC logs a line for every process Ray forks

import numpy as np
import torch

from benchmarks.report import (
    Settings,
    _host_cpu_seconds,
    headline_row,
    machine_info,
    model_folder,
    model_info,
    options,
    standalone,
    summary,
    write_json,
)

TARGET_REPLICA_SPEEDUP = 1.8  # images/s of 2 replicas / 1 replica, 1 torch thread each
STEPS = 8
CAPTION_TOKENS = 32
MAX_BATCH_WAIT_MS = 50.0
# One replica per configuration unless said; cpus_per_replica is what Ray reserves (and, through
# OMP_NUM_THREADS, torch's default threads); torch_threads sets torch's threads in the replica.
CONFIGS = {
    "1 replica x 1 thread": {"replicas": 1, "torch_threads": 1, "cpus_per_replica": 1, "max_batch_size": 1},
    "2 replicas x 1 thread": {"replicas": 2, "torch_threads": 1, "cpus_per_replica": 1, "max_batch_size": 1},
    "batch 1 (2 threads)": {"replicas": 1, "torch_threads": 2, "cpus_per_replica": 2, "max_batch_size": 1},
    "batch 4 (2 threads)": {"replicas": 1, "torch_threads": 2, "cpus_per_replica": 2, "max_batch_size": 4},
}
PAIRS = {  # comparison: (baseline, candidate)
    "replicas": ("1 replica x 1 thread", "2 replicas x 1 thread"),
    # The fair question on one host: does splitting its cores into replicas beat one replica using them all?
    "replicas_vs_all_cores": ("batch 1 (2 threads)", "2 replicas x 1 thread"),
    "batching": ("batch 1 (2 threads)", "batch 4 (2 threads)"),
}


def tree_cpu_seconds() -> float:
    """CPU seconds used by this process and its live descendants (Ray's GCS, raylet and replicas)."""
    parents, cpu = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    ours, grew = {os.getpid()}, True
    while grew:  # add children of what is already ours until nothing new joins
        grew = False
        for pid, parent in parents.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return sum(cpu[pid] for pid in ours if pid in cpu)


def embeddings(seeds: list[int], caption_dim: int) -> list[torch.Tensor]:
    return [
        torch.randn(CAPTION_TOKENS, caption_dim, generator=torch.Generator().manual_seed(seed))
        for seed in seeds
    ]


async def burst(client, seeds: list[int], caption_dim: int, side: int) -> tuple[dict, list[np.ndarray]]:  # type: ignore[no-untyped-def]
    """All requests at once; the burst's images/s, who served them, in what batches, and the pixels."""
    tensors = embeddings(seeds, caption_dim)
    wall, tree, host = time.perf_counter(), tree_cpu_seconds(), _host_cpu_seconds()
    images = await asyncio.gather(
        *(
            client.generate(embeddings=tensor, seed=seed, width=side, height=side, steps=STEPS)
            for tensor, seed in zip(tensors, seeds, strict=True)
        )
    )
    wall = time.perf_counter() - wall
    tree, host = tree_cpu_seconds() - tree, _host_cpu_seconds() - host
    others = min(1.0, max(0.0, host - tree) / (wall * (os.cpu_count() or 1))) if host else None
    timing = {
        "images": len(images),
        "wall_s": wall,
        "images_per_s": len(images) / wall,
        "our_cpu_s": tree,  # this process, Ray and the replicas
        "others_cpu_share": others,  # the rest of the host, 0 = idle
        "replicas": dict(Counter(image.info["replica"] for image in images)),
        "batch_sizes": [image.info["batch_size"] for image in images],
        "server_total_s_median": statistics.median(image.info["timings"]["total"] for image in images),
        "queue_s_max": max(image.info["timings"]["queue"] for image in images),
    }
    return timing, [np.asarray(image.convert("RGB")).astype(np.int16) for image in images]


async def run_config(name: str, folder: str, args: argparse.Namespace, seeds: list[int]) -> tuple[dict, list]:
    from zimage_split.client import AsyncClient
    from zimage_split.dit_service.config import GeneratorConfig, RayOptions
    from zimage_split.dit_service.server import start_generator_server

    started = time.perf_counter()
    options = RayOptions(address="local", max_batch_wait_ms=MAX_BATCH_WAIT_MS, **CONFIGS[name])
    server = await start_generator_server(
        GeneratorConfig(model=folder, encoder=None, port=0, device="cpu", dtype="float32", ray=options)
    )
    start_s = time.perf_counter() - started
    caption_dim = server.servicer.info.caption_dim
    try:
        async with AsyncClient(generator=f"127.0.0.1:{server.port}", timeout=600) as client:
            for warmup in range(args.warmup):
                await burst(
                    client, [900_000 + 100 * warmup + i for i in range(args.requests)], caption_dim, args.size
                )
            timing, pixels = await burst(client, seeds, caption_dim, args.size)
    finally:
        stopping = time.perf_counter()
        await server.stop(grace=0)
    timing |= {"server_start_s": start_s, "server_stop_s": time.perf_counter() - stopping}
    return timing, pixels


def max_pixel_diff(first: list[np.ndarray], second: list[np.ndarray]) -> int:
    return max(int(np.abs(a - b).max()) for a, b in zip(first, second, strict=True))


async def run(args: argparse.Namespace, folder: str) -> list[dict]:
    """Every round runs each configuration the pairs need once, in reverse order every other round."""
    rounds = []
    names = [name for name in CONFIGS if any(name in PAIRS[pair] for pair in pairs_to_run(args))]
    for index in range(args.rounds):
        seeds = [1000 * (index + 1) + i for i in range(args.requests)]
        result: dict = {"round": index + 1, "seeds": seeds, "order": [], "bursts": {}, "pairs": {}}
        pixels = {}
        for name in names if index % 2 == 0 else names[::-1]:
            result["order"].append(name)
            result["bursts"][name], pixels[name] = await run_config(name, folder, args, seeds)
            burst_result = result["bursts"][name]
            print(
                f"round {index + 1}/{args.rounds} {name:<22} {burst_result['images_per_s']:6.3f} images/s "
                f"({burst_result['wall_s']:6.2f} s for {args.requests})  batches "
                f"{sorted(Counter(burst_result['batch_sizes']).items())}  replicas "
                f"{sorted(burst_result['replicas'].values())}  (other processes: "
                f"{burst_result['others_cpu_share'] or 0:.0%} of the CPUs)",
                flush=True,
            )
        for pair in pairs_to_run(args):
            base, candidate = PAIRS[pair]
            result["pairs"][pair] = {
                "ratio": result["bursts"][candidate]["images_per_s"] / result["bursts"][base]["images_per_s"],
                "max_pixel_diff": max_pixel_diff(pixels[base], pixels[candidate]),
            }
        rounds.append(result)
    return rounds


def pairs_to_run(args: argparse.Namespace) -> list[str]:
    """Quick mode (the test suite) runs only the replica pair: every configuration costs a Ray start."""
    return ["replicas"] if args.quick else list(PAIRS)


def config_summary(rounds: list[dict], name: str) -> dict:
    bursts = [r["bursts"][name] for r in rounds]
    rates = summary([b["images_per_s"] for b in bursts])
    return {
        **CONFIGS[name],
        "images_per_s": {key.replace("_s", ""): value for key, value in rates.items()},
        "burst_wall_s_median": statistics.median(b["wall_s"] for b in bursts),
        "our_cpu_s_per_image_median": statistics.median(b["our_cpu_s"] / b["images"] for b in bursts),
        "server_total_s_median": statistics.median(b["server_total_s_median"] for b in bursts),
        "replicas_per_round": [len(b["replicas"]) for b in bursts],
        "batch_sizes": dict(sorted(Counter(size for b in bursts for size in b["batch_sizes"]).items())),
        "others_cpu_share_median": statistics.median(b["others_cpu_share"] or 0.0 for b in bursts),
        "server_start_s_median": statistics.median(b["server_start_s"] for b in bursts),
    }


def pair_summary(rounds: list[dict], configs: dict, pair: str) -> dict:
    base, candidate = PAIRS[pair]
    per_round = [r["pairs"][pair]["ratio"] for r in rounds]
    return {
        "baseline": base,
        "candidate": candidate,
        "ratio_median": configs[candidate]["images_per_s"]["median"]
        / configs[base]["images_per_s"]["median"],
        "ratio_per_round": per_round,
        "ratio_per_round_median": statistics.median(per_round),
        "ratio_per_round_spread": summary(per_round),
        "max_pixel_diff": max(r["pairs"][pair]["max_pixel_diff"] for r in rounds),
    }


def print_table(result: dict) -> None:
    settings = result["settings"]
    print()
    print(
        f"{settings['requests_per_burst']} concurrent {settings['width']}x{settings['height']} images, "
        f"{settings['steps']} steps, float32, {result['machine']['cpu_count']} CPUs, {settings['rounds']} rounds"
    )
    print(f"{'':<24}{'median img/s':>13}{'min':>8}{'max':>8}{'CPU s/img':>11}  batch sizes (count)")
    for name, stats in result["configurations"].items():
        rates = stats["images_per_s"]
        print(
            f"{name:<24}{rates['median']:>13.3f}{rates['min']:>8.3f}{rates['max']:>8.3f}"
            f"{stats['our_cpu_s_per_image_median']:>11.2f}  {stats['batch_sizes']}"
        )
    replicas, batching = result["replicas"], result["batching"]
    verdict = "met" if result["target_met"] else "NOT met"
    print(
        f"2 replicas / 1 replica: {replicas['ratio_median']:.2f}x (median per round "
        f"{replicas['ratio_per_round_median']:.2f}x; target >= {TARGET_REPLICA_SPEEDUP}: {verdict}); both "
        f"replicas served every round: {replicas['both_replicas_served_every_round']}"
    )
    if result["replicas_vs_all_cores"] is not None:
        all_cores = result["replicas_vs_all_cores"]
        print(
            f"2 replicas x 1 thread / 1 replica x 2 threads: {all_cores['ratio_median']:.2f}x (median per round "
            f"{all_cores['ratio_per_round_median']:.2f}x)"
        )
    if batching is not None:
        print(
            f"batch 4 / batch 1: {batching['ratio_median']:.2f}x (median per round "
            f"{batching['ratio_per_round_median']:.2f}x); batched images differ from unbatched by at most "
            f"{batching['max_pixel_diff']}/255"
        )
    print(f"other processes used a median {result['others_cpu_share_median']:.0%} of the CPUs meanwhile")


DEFAULTS = {"rounds": 10, "warmup": 1, "requests": 8, "size": 256}
QUICK = {"warmup": 0, "requests": 2, "size": 64}


def measure(settings: Settings, **overrides: object) -> dict:
    args = options(settings, DEFAULTS, QUICK, overrides)
    folder = model_folder(settings.model)
    import ray.serve  # noqa: F401  (it sets its logger's level on import; quiet it afterwards)

    logging.getLogger("ray.serve").setLevel(logging.WARNING)

    machine = machine_info()
    model = model_info(folder, settings.model)
    rounds = asyncio.run(run(args, folder))

    pairs = pairs_to_run(args)
    configs = {name: config_summary(rounds, name) for pair in pairs for name in PAIRS[pair]}
    replicas = pair_summary(rounds, configs, "replicas")
    all_cores = pair_summary(rounds, configs, "replicas_vs_all_cores") if "batching" in pairs else None
    batching = pair_summary(rounds, configs, "batching") if "batching" in pairs else None
    replicas["both_replicas_served_every_round"] = all(
        count == 2 for count in configs["2 replicas x 1 thread"]["replicas_per_round"]
    )
    replicas["target"] = f"ratio_median >= {TARGET_REPLICA_SPEEDUP}"
    replicas["target_met"] = replicas["ratio_median"] >= TARGET_REPLICA_SPEEDUP
    if batching is not None:
        batching["target"] = None  # none set; batching should at least not lose throughput
        batching["faster"] = batching["ratio_median"] > 1.0
    result = {
        "benchmark": "ray",
        "description": "images/s of a burst of concurrent AsyncClient.generate calls (uploaded random "
        "embeddings, no encoder) through the generator's gRPC front to Ray Serve CPU replicas in this host",
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
        "model": model,
        "settings": {
            "width": args.size,
            "height": args.size,
            "dit_image_tokens": (args.size // (2 * model["vae_scale_factor"])) ** 2,  # 2x2 patches
            "caption_tokens": CAPTION_TOKENS,
            "steps": STEPS,
            "dtype": "float32",
            "device": "cpu",
            "requests_per_burst": args.requests,
            "rounds": args.rounds,
            "warmup_bursts_per_server_start": args.warmup,
            "quick": settings.quick,
            "max_batch_wait_ms": MAX_BATCH_WAIT_MS,
            "ray_address": "local",
            "configurations": CONFIGS,
            "procedure": "each round starts every configuration's server afresh (Ray in this process), "
            "runs the warm-up bursts, one timed burst, and stops it; the order within a pair flips every "
            "round; both sides of a pair get the same embeddings and seeds",
        },
        "rounds": rounds,
        "configurations": configs,
        "replicas": replicas,
        "replicas_vs_all_cores": all_cores,
        "batching": batching,
        "others_cpu_share_median": statistics.median(
            b["others_cpu_share"] or 0.0 for r in rounds for b in r["bursts"].values()
        ),
        "target": f"2 replicas / 1 replica images/s (medians) >= {TARGET_REPLICA_SPEEDUP}",
        "target_met": replicas["target_met"] and replicas["both_replicas_served_every_round"],
    }
    result["headline"] = headline(result)
    return result


def headline(result: dict) -> list[dict]:
    configs, replicas, batching = result["configurations"], result["replicas"], result["batching"]
    all_cores = result["replicas_vs_all_cores"]
    size = f"{result['settings']['width']}x{result['settings']['height']}"
    rows = [
        headline_row(
            "ray",
            f"2 Ray replicas against 1 (1 thread each), {size}",
            unit="images/s",
            ours=configs[replicas["candidate"]]["images_per_s"]["median"],
            baseline=configs[replicas["baseline"]]["images_per_s"]["median"],
            baseline_name="1 replica",
            ratio=replicas["ratio_median"],
            ratio_meaning="2 replicas / 1 (higher is better)",
            target=f">= {TARGET_REPLICA_SPEEDUP}",
            target_met=result["target_met"],
            note=f"both replicas served every burst: {replicas['both_replicas_served_every_round']}; per-round "
            f"ratio IQR {replicas['ratio_per_round_spread']['q1_s']:.3f}-"
            f"{replicas['ratio_per_round_spread']['q3_s']:.3f}, {replicas['ratio_per_round_spread']['rounds']} rounds",
        )
    ]
    if all_cores is not None:
        spread = all_cores["ratio_per_round_spread"]
        rows.append(
            headline_row(
                "ray",
                f"2 Ray replicas (1 thread each) against 1 replica with both threads, {size}",
                unit="images/s",
                ours=configs[all_cores["candidate"]]["images_per_s"]["median"],
                baseline=configs[all_cores["baseline"]]["images_per_s"]["median"],
                baseline_name="1 replica, 2 threads",
                ratio=all_cores["ratio_median"],
                ratio_meaning="2 replicas / 1 replica using every core (higher is better)",
                note=f"per-round ratio median {spread['median_s']:.3f}, IQR {spread['q1_s']:.3f}-"
                f"{spread['q3_s']:.3f}, {spread['rounds']} rounds",
            )
        )
    if batching is not None:
        rows.append(
            headline_row(
                "ray",
                f"batch 4 against batch 1 (one replica, 2 threads), {size}",
                unit="images/s",
                ours=configs[batching["candidate"]]["images_per_s"]["median"],
                baseline=configs[batching["baseline"]]["images_per_s"]["median"],
                baseline_name="batch 1",
                ratio=batching["ratio_median"],
                ratio_meaning="batch 4 / batch 1 (higher is better)",
                note=f"batch sizes seen {configs[batching['candidate']]['batch_sizes']}; largest pixel "
                f"difference {batching['max_pixel_diff']}/255",
            )
        )
    return rows


def main() -> None:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--warmup", type=int, default=None, help="untimed bursts after each server start (1)"
        )
        parser.add_argument("--requests", type=int, default=None, help="concurrent requests per burst (8)")
        parser.add_argument("--size", type=int, default=None, help="image width and height in pixels (256)")

    settings, overrides, out = standalone(__doc__, "ray", flags)
    result = measure(settings, **overrides)
    print_table(result)
    print(f"wrote {write_json(result, out, 'ray')}")


if __name__ == "__main__":
    main()
