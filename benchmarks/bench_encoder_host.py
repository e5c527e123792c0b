"""The encoder host at its hardware's limit: tokens/s of the text encoder against this machine's matmul peak.

For each dtype, in a fresh process (so its memory figures are its own):

- **peak**: the best matmul throughput this machine reaches in that dtype with the threads in use, over
  the encoder's own weight shapes and a square one, at 1024 and 2048 rows.
- **memory**: peak RSS while loading the encoder (on the thread that then runs it) and steady RSS after,
  against the bytes of the weights kept.
- **engine**: tokens/s of `TextEncoder.encode` in this process at batch 1, 4 and 16 prompts of mixed
  lengths, with `--batching exact` (one pass per prompt, bit-identical to alone) and `padded` (one
  right-padded pass). % of peak = the FLOPs the encoder does (2 x multiply-adds of every matmul, causal
  attention included, padding not counted) / seconds / peak.
- **service**: the same batches through `zsplit serve encoder` in a process of its own (one Encode call per
  batch from this process, new prompts every round so the cache never answers), against the engine's exact
  figure.
- **levers** (`--levers`): the engine at batch 4, exact, with 1 thread instead of all, with eager
  attention instead of SDPA, and with `torch.compile` of the decoder layers; and, in a process of its own,
  plain `nn.Linear` instead of oneDNN-packed weights (`--no-pack-weights`).

The `full` preset has the real Qwen3-4B sizes with random weights; its tokenizer is byte-level, so a
prompt's tokens are its UTF-8 bytes plus the chat template. Figures from a shared machine carry the share
of the CPUs other processes used meanwhile.

    python -m benchmarks.bench_encoder_host --model full --dtypes bfloat16,float32
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import (
    Settings,
    clock,
    headline_row,
    machine_info,
    model_folder,
    model_info,
    options,
    since,
    standalone,
    write_json,
)

TARGET_PEAK_SHARE = 0.70  # at batch >= 4, in the dtype the machine's matmul units are built for
TARGET_RSS_RATIO = 1.15  # peak RSS while loading / weight bytes
TEXT = (
    "a red fox sits in fresh snow at the edge of a pine forest at dawn with soft golden light and thin mist "
    "between the trees while an old lighthouse stands on a rocky coast under dramatic clouds and waves break"
)
DEFAULTS = {
    "rounds": 10,
    "warmup": 1,
    "dtypes": "bfloat16,float32",
    "batches": "1,4,16",
    "service": True,
    "levers": False,
}
QUICK = {"warmup": 0, "batches": "1,4", "dtypes": "float32"}


def prompt_pool(count: int, round_tag: str = "") -> list[str]:
    """`count` prompts of 40 to 200 characters, lengths spread evenly, different text for every `round_tag`."""
    prompts, words_available = [], TEXT.split()
    for index in range(count):
        target = 40 + (160 * index) // max(1, count - 1)
        words = [round_tag] if round_tag else []
        position = index
        while len(" ".join(words)) < target:
            words.append(words_available[position % len(words_available)])
            position += 7
        prompts.append(" ".join(words)[:target])
    # Mixed in order, so batch 4 takes short and long ones alike.
    return prompts[::2] + prompts[1::2]


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_kinds() -> dict:
    """Resident KiB by kind: anonymous (the process's own copies) and file (memory-mapped weights)."""
    with open("/proc/self/status") as handle:
        fields = dict(line.split(":", 1) for line in handle if ":" in line)
    return {key: int(fields[key].split()[0]) for key in ("RssAnon", "RssFile") if key in fields}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def matmul_peak(dtype: torch.dtype, shapes: list[tuple[int, int]], seconds: float = 1.5) -> dict:
    """The best TFLOP/s of `x @ w.T` over the encoder's weight shapes and a square one, at 1024 and 2048 rows."""
    best: dict = {"tflops": 0.0}
    with torch.inference_mode():
        for out_features, in_features in [*shapes, (4096, 4096)]:
            weight = torch.randn(out_features, in_features, dtype=dtype)
            for rows in (1024, 2048):
                x = torch.randn(rows, in_features, dtype=dtype)
                torch.nn.functional.linear(x, weight)
                started, calls = time.perf_counter(), 0
                while time.perf_counter() - started < seconds:
                    torch.nn.functional.linear(x, weight)
                    calls += 1
                tflops = (
                    2 * rows * in_features * out_features * calls / (time.perf_counter() - started) / 1e12
                )
                if tflops > best["tflops"]:
                    best = {"tflops": tflops, "rows": rows, "in": in_features, "out": out_features}
    return best


def prompt_flops(config: object, layers: int, tokens: int) -> float:
    """FLOPs of one prompt's pass through `layers` Qwen3 decoder layers (2 per multiply-add)."""
    hidden = config.hidden_size  # type: ignore[attr-defined]
    heads = config.num_attention_heads  # type: ignore[attr-defined]
    kv_heads = config.num_key_value_heads  # type: ignore[attr-defined]
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = config.intermediate_size  # type: ignore[attr-defined]
    linear = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate
    # Causal attention: query i meets i + 1 keys, for QK^T and for the weighted sum of V.
    attention = 2 * heads * head_dim * tokens * (tokens + 1) / 2
    return 2.0 * layers * (linear * tokens + attention)


def timed_rounds(run, rounds: int, warmup: int) -> dict:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        run(-1)
    elapsed = []
    for index in range(rounds):
        start = clock()
        run(index)
        elapsed.append(since(start))
    return timing_of(elapsed)


def timing_of(elapsed: list[dict]) -> dict:
    """Median, fastest and slowest of rounds timed with `since`, and how busy the rest of the host was."""
    walls = [round_["wall_s"] for round_ in elapsed]
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "rounds": len(walls),
        "others_cpu_share_median": statistics.median(round_["others_cpu_share"] or 0.0 for round_ in elapsed),
    }


def figures(timing: dict, tokens: int, flops: float, peak_tflops: float) -> dict:
    seconds = timing["median_s"]
    return timing | {
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "tflops": flops / seconds / 1e12,
        "peak_share": flops / seconds / 1e12 / peak_tflops,
        # The spread: the best and worst rounds as shares of the peak.
        "peak_share_range": [
            flops / timing["max_s"] / 1e12 / peak_tflops,
            flops / timing["min_s"] / 1e12 / peak_tflops,
        ],
    }


def run_case(folder: str, dtype_name: str, args: argparse.Namespace) -> dict:
    """One dtype, measured in this (fresh) process: memory, peak, engine and levers, then the service."""
    from zimage_split.devices import torch_thread

    thread = torch_thread("encoder")
    result = measure_engine(folder, dtype_name, thread, args)
    gc.collect()
    if args.service:
        result["service"] = asyncio.run(
            service_cases(folder, dtype_name, [int(b) for b in str(args.batches).split(",")], result, args)
        )
    thread.shutdown()
    return result


def measure_engine(folder: str, dtype_name: str, thread, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    from zimage_split.encoder_service.engine import TextEncoder
    from zimage_split.model_source import resolve_model

    dtype = getattr(torch, dtype_name)
    source = resolve_model(folder)
    before = rss_bytes()
    started = time.perf_counter()
    pack = getattr(args, "pack_weights", True)
    encoder = thread.submit(
        lambda: TextEncoder(source, device=torch.device("cpu"), dtype=dtype, pack_weights=pack)
    ).result()
    load_seconds = time.perf_counter() - started
    gc.collect()
    weights = encoder.weight_bytes + sum(t.numel() * t.element_size() for t in encoder.model.buffers())
    memory = {
        "weights_bytes": weights,
        "rss_before_load_bytes": before,
        "peak_rss_bytes": peak_rss_bytes(),
        "steady_rss_bytes": rss_bytes(),
        "load_seconds": load_seconds,
    }
    # Weights read from safetensors in their own dtype stay memory-mapped until a pass touches them, so the
    # figure that counts is the one after the first pass: file-backed pages, then, not a second copy.
    warm_up = encoder.tokenize(prompt_pool(1)[0], hidden_layer=encoder.hidden_layer, max_sequence_length=512)
    thread.submit(encoder.encode, [warm_up]).result()
    gc.collect()
    memory |= {
        "peak_rss_after_first_pass_bytes": peak_rss_bytes(),
        "steady_rss_after_first_pass_bytes": rss_bytes(),
        "rss_anonymous_and_file_kib": rss_kinds(),
    }
    for key in ("peak_rss", "steady_rss", "peak_rss_after_first_pass", "steady_rss_after_first_pass"):
        memory[f"{key}_over_weights"] = (memory[f"{key}_bytes"] - before) / weights
    print(
        f"{dtype_name}: weights {weights / 2**30:.2f} GiB; RSS over them: peak {memory['peak_rss_over_weights']:.3f}x "
        f"while loading ({load_seconds:.1f} s), peak {memory['peak_rss_after_first_pass_over_weights']:.3f}x and "
        f"steady {memory['steady_rss_after_first_pass_over_weights']:.3f}x after the first pass "
        f"({memory['rss_anonymous_and_file_kib']})",
        flush=True,
    )
    config = encoder.model.config
    layer = encoder.model.layers[0]
    shapes = sorted({(m.out_features, m.in_features) for m in layer.modules() if hasattr(m, "out_features")})
    peak = thread.submit(matmul_peak, dtype, shapes).result()
    print(
        f"{dtype_name}: matmul peak {peak['tflops']:.3f} TFLOP/s ({torch.get_num_threads()} threads)",
        flush=True,
    )
    batches = [int(b) for b in str(args.batches).split(",")]

    def tokenized(count: int, tag: str) -> list:  # type: ignore[type-arg]
        return [
            encoder.tokenize(text, hidden_layer=encoder.hidden_layer, max_sequence_length=512)
            for text in prompt_pool(count, tag)
        ]

    def engine_case(batch: int, batching: str) -> dict:
        prompts = tokenized(batch, "")
        tokens = sum(len(p.input_ids) for p in prompts)
        flops = sum(prompt_flops(config, encoder.layers_loaded, len(p.input_ids)) for p in prompts)
        encoder.batching = batching
        timing = thread.submit(
            timed_rounds, lambda _: encoder.encode(prompts), args.rounds, args.warmup
        ).result()
        row = figures(timing, tokens, flops, peak["tflops"]) | {"batch": batch, "batching": batching}
        print(
            f"{dtype_name} engine  {batching:>6} batch {batch:>2}: {row['tokens_per_s']:7.1f} tokens/s, "
            f"{row['peak_share']:.0%} of peak (others {timing['others_cpu_share_median']:.0%})",
            flush=True,
        )
        return row

    engine = [engine_case(batch, batching) for batching in ("exact", "padded") for batch in batches]
    encoder.batching = "exact"
    levers = (
        thread.submit(lever_cases, encoder, tokenized, config, peak, args).result() if args.levers else []
    )
    return {
        "dtype": dtype_name,
        "packed_linears": encoder.packed_linears,
        "threads": torch.get_num_threads(),
        "peak": peak,
        "memory": memory,
        "engine": engine,
        "levers": levers,
    }


def lever_cases(encoder, tokenized, config, peak: dict, args: argparse.Namespace) -> list[dict]:  # type: ignore[no-untyped-def]
    """Batch 4, exact: the baseline, then one change at a time."""
    prompts = tokenized(4, "")
    tokens = sum(len(p.input_ids) for p in prompts)
    flops = sum(prompt_flops(config, encoder.layers_loaded, len(p.input_ids)) for p in prompts)

    def case(name: str) -> dict:
        timing = timed_rounds(lambda _: encoder.encode(prompts), args.rounds, max(1, args.warmup))
        row = figures(timing, tokens, flops, peak["tflops"]) | {"lever": name}
        print(
            f"lever {name:<28}: {row['tokens_per_s']:7.1f} tokens/s, {row['peak_share']:.0%} of peak",
            flush=True,
        )
        return row

    rows = [
        case(f"baseline ({torch.get_num_threads()} threads, sdpa, {encoder.packed_linears} packed linears)")
    ]
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
        rows.append(case("1 thread"))
        torch.set_num_threads(threads)
    implementation = encoder.model.config._attn_implementation
    encoder.model.set_attn_implementation("eager")
    rows.append(case("eager attention"))
    encoder.model.set_attn_implementation(implementation)
    if encoder.packed_linears:
        # Inductor cannot lower oneDNN's opaque packed weights; the unpacked case measures compile.
        return rows
    layers = encoder.model.layers
    originals = [layer.forward for layer in layers]
    # One code object for every layer: past dynamo's default of 8 entries the rest would run uncompiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(layers))
    started = time.perf_counter()
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    compiled = case("torch.compile (dynamic)")
    compiled["compile_and_run_seconds"] = time.perf_counter() - started
    rows.append(compiled)
    for layer, forward in zip(layers, originals, strict=True):
        layer.forward = forward
    return rows


async def service_cases(  # type: ignore[no-untyped-def]
    folder: str, dtype_name: str, batches: list[int], case: dict, args
) -> list[dict]:
    """Each batch as one Encode call to `zsplit serve encoder` in a process of its own (the client stays
    here, as in a deployment); new text every round, so the cache never answers."""
    from transformers import AutoConfig

    from benchmarks.bench_encoder_pool import EncoderProcess
    from zimage_split.client import AsyncClient

    config = AutoConfig.from_pretrained(folder, subfolder="text_encoder")
    layers = int(config.num_hidden_layers) - 1  # hidden_layer -2: the layers after it are not run
    flags = ["--max-batch-size", "64"] + (
        [] if getattr(args, "pack_weights", True) else ["--no-pack-weights"]
    )
    server = EncoderProcess(folder, None, *flags, dtype=dtype_name)
    rows = []
    try:
        server.wait_serving()
        async with AsyncClient(generator=None, encoder=server.address, timeout=3600) as client:
            for batch in batches:
                # Tags of equal length keep every round's token counts the same.
                tags = [f"r{index:03d}" for index in range(args.warmup + args.rounds)]
                elapsed, lengths, every_call = [], [], []
                for index, tag in enumerate(tags):
                    start = clock()
                    embeddings = await client.encode(prompt_pool(batch, tag))
                    lengths = [item.token_count for item in embeddings]
                    took = since(start)
                    every_call.append(sum(lengths) / took["wall_s"])
                    if index >= args.warmup:
                        elapsed.append(took)
                tokens = sum(lengths)
                flops = sum(prompt_flops(config, layers, n) for n in lengths)
                # Here the encoder is another process: its CPU counts among the others'.
                timing = timing_of(elapsed)
                row = figures(timing, tokens, flops, case["peak"]["tflops"]) | {
                    "batch": batch,
                    "batching": "exact",
                    # Warm-up calls included, in order: the first batch size's first calls are the
                    # service's first calls after SERVING (does it reach full speed at once?).
                    "every_call_tokens_per_s": every_call,
                }
                print(
                    f"{dtype_name} service  exact batch {batch:>2}: {row['tokens_per_s']:7.1f} tokens/s, "
                    f"{row['peak_share']:.0%} of peak",
                    flush=True,
                )
                rows.append(row)
    finally:
        server.stop()
    return rows


def measure(settings: Settings, **overrides: object) -> dict:
    args = options(settings, DEFAULTS, QUICK, overrides)
    folder = model_folder("tiny" if settings.quick else settings.model)

    def case(dtype_name: str, case_args: dict) -> dict:
        # A fresh process per case: its peak RSS is that load alone.
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "case.json"
            command = [
                sys.executable, "-m", "benchmarks.bench_encoder_host", "--case", dtype_name, "--folder", folder,
                "--case-out", str(out), "--case-args", json.dumps(case_args),
            ]  # fmt: skip
            subprocess.run(command, check=True, cwd=Path(__file__).resolve().parent.parent)
            return dict(json.loads(out.read_text()))

    dtypes = str(args.dtypes).split(",")
    cases = [case(dtype_name, vars(args)) for dtype_name in dtypes]
    # The packing lever needs an encoder built without it: its own process, batches and rounds as above.
    unpacked = (
        [case(dtypes[0], vars(args) | {"pack_weights": False, "service": False})] if args.levers else []
    )
    result: dict = {
        "benchmark": "encoder_host",
        "description": "text-encoder tokens/s on this CPU against its own matmul peak, in-process and through the "
        "service, with peak and steady RSS against the weights",
        "machine": machine_info() | {"cpu_flags": cpu_flags()},
        "model": model_info(folder, "tiny" if settings.quick else settings.model),
        "settings": {
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "batches": args.batches,
            "quick": settings.quick,
        },
        "prompts": prompt_pool(16),
        "cases": cases,
        "unpacked": unpacked,
        "note": "tokens are the byte-level tokenizer's (one per UTF-8 byte plus the chat template); FLOPs count "
        "only real tokens, so padded batching's padding is work the % of peak does not credit",
    }
    result["headline"] = headline(result)
    result["target"] = (
        f"engine >= {TARGET_PEAK_SHARE:.0%} of the matmul peak at batch >= 4; peak RSS while loading "
        f"<= {TARGET_RSS_RATIO}x the weights (on the full preset)"
    )
    verdicts = [row["target_met"] for row in result["headline"] if row["target_met"] is not None]
    result["target_met"] = all(verdicts) if verdicts else None
    return result


def cpu_flags() -> list[str]:
    from zimage_split.devices import cpu_features

    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")
    return sorted(flag for flag in cpu_features() if flag in wanted)


def headline(result: dict) -> list[dict]:
    # The targets are the real encoder's: a smaller model's matrices are too small for the matmul peak, and
    # its weights too light against the torch runtime for the RSS ratio, so its rows carry no verdict.
    judged = result["model"].get("name") == "full"
    scope = "" if judged else " (full only)"
    rows = []
    for case in result["cases"]:
        for row in case["engine"]:
            if row["batch"] < 4:
                continue
            rows.append(
                headline_row(
                    "encoder_host",
                    f"encoder {case['dtype']} batch {row['batch']} ({row['batching']})",
                    unit="tokens/s",
                    ours=row["tokens_per_s"],
                    ratio=row["peak_share"],
                    ratio_meaning="share of the matmul peak",
                    target=f">= {TARGET_PEAK_SHARE}{scope}",
                    target_met=row["peak_share"] >= TARGET_PEAK_SHARE if judged else None,
                    note=f"peak {case['peak']['tflops']:.2f} TFLOP/s, {case['threads']} threads",
                )
            )
        memory = case["memory"]
        rows.append(
            headline_row(
                "encoder_host",
                f"peak RSS, encoder load and first pass, {case['dtype']}",
                unit="x weights",
                ours=memory["peak_rss_after_first_pass_over_weights"],
                target=f"<= {TARGET_RSS_RATIO}{scope}",
                target_met=memory["peak_rss_after_first_pass_over_weights"] <= TARGET_RSS_RATIO
                if judged
                else None,
                note=f"weights {memory['weights_bytes'] / 2**30:.2f} GiB; through the load and the first pass; steady "
                f"{memory['steady_rss_after_first_pass_over_weights']:.3f}x",
            )
        )
    return rows


def print_table(result: dict) -> None:
    machine = result["machine"]
    print(
        f"\n{machine['cpu']} ({', '.join(machine['cpu_flags'])}), {machine['torch_threads']} threads, commit {machine['git_commit']}"
    )
    print(f"{'dtype':<9}{'where':<9}{'batching':<9}{'batch':>6}{'tokens/s':>10}{'% peak':>8}{'range':>12}")
    for case in result["cases"] + result["unpacked"]:
        for row in case["engine"] + case.get("service", []):
            where = "engine" if row in case["engine"] else "service"
            if not case["packed_linears"]:
                where += "*"
            low, high = row["peak_share_range"]
            print(
                f"{case['dtype']:<9}{where:<9}{row['batching']:<9}{row['batch']:>6}{row['tokens_per_s']:>10.1f}"
                f"{row['peak_share']:>8.0%}{f'{low:.0%}-{high:.0%}':>12}"
            )
        memory = case["memory"]
        print(
            f"{case['dtype']}{'' if case['packed_linears'] else ' (* plain nn.Linear)'}: peak "
            f"{case['peak']['tflops']:.3f} TFLOP/s; weights {memory['weights_bytes'] / 2**30:.2f} GiB, "
            f"peak RSS {memory['peak_rss_after_first_pass_over_weights']:.3f}x (load and first pass), steady "
            f"{memory['steady_rss_after_first_pass_over_weights']:.3f}x"
        )


def main() -> None:
    if "--case" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--case")
        parser.add_argument("--folder")
        parser.add_argument("--case-out")
        parser.add_argument("--case-args")
        known = parser.parse_args()
        result = run_case(known.folder, known.case, argparse.Namespace(**json.loads(known.case_args)))
        Path(known.case_out).write_text(json.dumps(result))
        return

    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (1)")
        parser.add_argument("--dtypes", default=None, help="comma-separated (bfloat16,float32)")
        parser.add_argument("--batches", default=None, help="prompts per batch, comma-separated (1,4,16)")
        parser.add_argument("--no-service", dest="service", action="store_const", const=False, default=None)
        parser.add_argument(
            "--levers", action="store_const", const=True, default=None, help="also threads, eager, compile"
        )

    settings, overrides, out = standalone(__doc__, "encoder_host", flags)
    result = measure(settings, **overrides)
    print_table(result)
    print(f"wrote {write_json(result, out, 'encoder_host')}")


if __name__ == "__main__":
    main()
