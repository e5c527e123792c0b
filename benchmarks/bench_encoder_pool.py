"""Two encoders against one, on a load bound by encoding: prompts/s through the SDK's encoder pool.

Each encoder is a real `zsplit serve encoder` process pinned to its own core (`taskset`) with one torch
thread, so one encoder has one core and two have two: the ideal ratio is 2.0. The client sends `--prompts`
distinct prompts (none cached) as concurrent Encode calls through `AsyncClient(encoder="A,B")`, which
spreads them over the healthy encoders (least outstanding first).

    python -m benchmarks.bench_encoder_pool --model bench --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import (
    Settings,
    headline_row,
    machine_info,
    model_folder,
    options,
    standalone,
    write_json,
)

DEFAULTS = {"rounds": 10, "warmup": 1, "prompts": 32, "prompt_chars": 300}
QUICK = {"warmup": 0, "prompts": 8, "prompt_chars": 40}
TARGET_RATIO = 1.6  # two encoders / one, each on its own core


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EncoderProcess:
    """`zsplit serve encoder` in a process of its own, with a cache too small to answer; `core` pins it to one
    core with one torch thread."""

    def __init__(self, folder: str, core: int | None, *flags: str, dtype: str = "bfloat16") -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="zsplit-encoder-", suffix=".log", delete=False)  # noqa: SIM115
        command = [sys.executable, "-m", "zimage_split.cli", "serve", "encoder", "--model", folder]
        command += ["--port", str(self.port), "--device", "cpu", "--insecure", "--dtype", dtype]
        command += ["--cache-mb", "1", *flags]
        environment = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if core is not None and shutil.which("taskset"):
            command = ["taskset", "-c", str(core), *command]
            environment["OMP_NUM_THREADS"] = "1"
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=environment)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 600) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"encoder exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                with grpc.insecure_channel(self.address) as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"encoder on {self.address} never reported SERVING")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        os.unlink(self.log.name)


def prompts_for(round_tag: str, count: int, chars: int) -> list[str]:
    words = [
        "a",
        "lighthouse",
        "on",
        "a",
        "rocky",
        "coast",
        "at",
        "dusk",
        "with",
        "waves",
        "breaking",
        "under",
        "dramatic",
        "clouds",
    ]
    result = []
    for index in range(count):
        text = f"{round_tag} prompt {index:03d}:"
        position = index
        while len(text) < chars:
            text += " " + words[position % len(words)]
            position += 3
        result.append(text[:chars])
    return result


async def prompts_per_second(addresses: list[str], args: argparse.Namespace, label: str) -> dict:
    from zimage_split.client import AsyncClient

    seconds = []
    async with AsyncClient(generator=None, encoder=",".join(addresses), timeout=600) as client:
        for index in range(args.warmup + args.rounds):
            batch = prompts_for(f"{label}{index:02d}", args.prompts, args.prompt_chars)
            started = time.perf_counter()
            await asyncio.gather(*(client.encode([prompt]) for prompt in batch))
            if index >= args.warmup:
                seconds.append(time.perf_counter() - started)
    rates = [args.prompts / s for s in seconds]
    return {
        "encoders": len(addresses),
        "prompts_per_s_median": statistics.median(rates),
        "prompts_per_s_min": min(rates),
        "prompts_per_s_max": max(rates),
        "rounds_s": seconds,
    }


def measure(settings: Settings, **overrides: object) -> dict:
    args = options(settings, DEFAULTS, QUICK, overrides)
    folder = model_folder("tiny" if settings.quick else settings.model)
    cores = os.cpu_count() or 1
    encoders = [EncoderProcess(folder, core % cores) for core in range(2)]
    try:
        for encoder in encoders:
            encoder.wait_serving()
        one = asyncio.run(prompts_per_second([encoders[0].address], args, "one"))
        two = asyncio.run(prompts_per_second([e.address for e in encoders], args, "two"))
        # Once more with one, so a drift in the host's load shows as a difference between the two.
        one_again = asyncio.run(prompts_per_second([encoders[1].address], args, "again"))
    finally:
        for encoder in encoders:
            encoder.stop()
    single = statistics.median([one["prompts_per_s_median"], one_again["prompts_per_s_median"]])
    ratio = two["prompts_per_s_median"] / single
    result = {
        "benchmark": "encoder_pool",
        "description": "prompts/s of concurrent Encode calls through the SDK's encoder pool: two encoder "
        "processes (one core and one torch thread each) against one",
        "machine": machine_info(),
        "settings": {
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "prompts": args.prompts,
            "prompt_chars": args.prompt_chars,
            "model": "tiny" if settings.quick else settings.model,
            "pinned": bool(shutil.which("taskset")),
            "quick": settings.quick,
        },
        "one": one,
        "two": two,
        "one_again": one_again,
        "ratio": ratio,
        "target": f"two / one >= {TARGET_RATIO} (ideal 2.0)",
        "target_met": ratio >= TARGET_RATIO,
    }
    result["headline"] = [
        headline_row(
            "encoder_pool",
            f"{args.prompts} concurrent prompts, two encoders against one",
            unit="prompts/s",
            ours=two["prompts_per_s_median"],
            baseline=single,
            baseline_name="one encoder (median of the runs before and after)",
            ratio=ratio,
            ratio_meaning="two / one (higher is better)",
            target=f">= {TARGET_RATIO}",
            target_met=ratio >= TARGET_RATIO,
            note="one core and one torch thread per encoder",
        )
    ]
    return result


def main() -> None:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (1)")
        parser.add_argument("--prompts", type=int, default=None, help="concurrent prompts per round (32)")
        parser.add_argument("--prompt-chars", type=int, default=None, help="characters per prompt (300)")

    settings, overrides, out = standalone(__doc__, "encoder_pool", flags)
    result = measure(settings, **overrides)
    print(
        f"one encoder {result['one']['prompts_per_s_median']:.2f} and {result['one_again']['prompts_per_s_median']:.2f} "
        f"prompts/s, two {result['two']['prompts_per_s_median']:.2f}: ratio {result['ratio']:.2f} "
        f"(target {result['target']})"
    )
    print(f"wrote {write_json(result, out, 'encoder_pool')}")


if __name__ == "__main__":
    main()
