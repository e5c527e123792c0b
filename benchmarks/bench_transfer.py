"""Embedding transfer throughput on loopback: our two transfer paths against raw gRPC bytes, in one process.

The tensor is the real model's largest prompt embedding, 512 x 2560 bfloat16 (2,621,440 bytes), on both
of the paths an embedding travels:

- upload (client -> generator): `AsyncClient.upload(tensor)` to a real generator server. Included: tensor
  to bytes (a zero-copy view), BLAKE3 on the sender, a header message and 1 MiB chunk messages (written by
  wire.encode_chunk_message, read by wire.decode_chunk_message), the server's interceptors, the generator
  joining and hashing the chunks and checking the header, back to a
  torch tensor, `validate_embedding` (shape, token count, every value finite) and the cache put.
- encode (encoder -> client): `AsyncClient.encode(prompt)` for a prompt already in the encoder's cache.
  Included: the request, the chat template and tokenizer (cached per prompt text), the cache hit (which
  holds the bytes, already written as chunk messages, and their BLAKE3 made once, so the sender neither
  hashes nor copies again), a header and the chunk messages, the client joining and hashing the chunks and
  checking BLAKE3, back to a tensor.

An embedding is as wide as the text encoder's hidden size, and the generator refuses one that does not
match its DiT's `cap_feat_dim`. So both services load the tiny random model widened to the real 2560 (the
text encoder's hidden size and the DiT's caption width; nothing else changes), built in a temporary
folder: the weights play no part in a transfer. The prompt is long enough to be truncated to 512 tokens.

raw: a `grpc.aio` server with generic handlers and no serializers (bytes pass through untouched), the same
server and channel options, the same 1 MiB chunks and the same direction. Upload joins the chunks into
one bytes object on the server, which answers its length; download streams slices of a bytes object and
the client joins them. The target is ours / raw.

raw_blake3, for reading the gap only: raw plus what our wire format's integrity check costs, the sender
hashing the whole payload with BLAKE3 and sending the hex digest first, the receiver hashing the chunks as
they arrive and comparing.

Each round times `transfers` back-to-back transfers of each side of each path, the sides in turn and their
order reversed every round. The JSON also times BLAKE3 (and sha256, the checksum before it),
validate_embedding and the tokenizer on their own.

    python -m benchmarks.bench_transfer --rounds 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import torch
from blake3 import blake3
from grpc import aio

from benchmarks.report import (
    Settings,
    clock,
    headline_row,
    machine_info,
    options,
    since,
    standalone,
    summary,
    write_json,
)

TARGET_RATIO = 0.8  # ours / raw, median MB/s, on each path
SIDES = ("ours", "raw", "raw_blake3")
HIDDEN_SIZE = 2560  # Qwen3-4B's hidden size: Z-Image's cap_feat_dim
DEFAULTS = {"rounds": 30, "warmup": 1, "transfers": 10, "tokens": 512}
QUICK = {"warmup": 1, "transfers": 2, "tokens": 16}
RAW_SERVICE = "bench.RawBytes"
# The tiny model's tokenizer makes one token per byte, so this is far more than 512 tokens.
PROMPT = " ".join(["a lighthouse on a rocky cliff at dusk, waves below, gulls, warm light"] * 12)

PATHS = {
    "upload": {
        "direction": "client -> generator (client stream)",
        "ours": "AsyncClient.upload(tensor) to the generator's UploadEmbedding: wire.describe (zero-copy "
        "bytes view, BLAKE3), a header message + 1 MiB chunk messages (wire.encode_chunk_message), the "
        "server's interceptors, "
        "wire.TensorAssembler (joins and hashes the chunks, BLAKE3 check), torch.frombuffer, validate_embedding "
        "(shape, tokens, every value finite), the generator's LRU put; the reply is the key",
        "raw": "1 MiB bytes slices streamed (no serializer) to a generic stream_unary handler that joins "
        "them into one bytes object and answers its length",
        "raw_blake3": "raw, with the payload's hex BLAKE3 sent first and the chunks hashed on arrival",
    },
    "encode": {
        "direction": "encoder -> client (server stream)",
        "ours": "AsyncClient.encode(prompt) for a prompt already in the encoder's cache: the request, chat "
        "template and tokenizer (cached), the cache hit (chunk messages and BLAKE3 made once), a header "
        "message + the 1 MiB chunk messages, read_embedding_stream (joins and hashes the chunks, BLAKE3 "
        "check, torch.frombuffer)",
        "raw": "a generic unary_stream handler yields 1 MiB slices of a bytes object (no serializer); the "
        "client joins them into one bytes object",
        "raw_blake3": "raw, with the payload hashed per call and its hex BLAKE3 sent first, the chunks "
        "hashed on arrival",
    },
}


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No progress bars from transformers and diffusers while the model is built and loaded."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on[0]:
            transformers_logging.enable_progress_bar()
        if was_on[1]:
            diffusers_logging.enable_progress_bar()


def build_wide_model(root: Path, hidden_size: int) -> Path:
    """The tiny random model with the text encoder's hidden size and the DiT's caption width set to
    `hidden_size`, so the services send and accept embeddings as wide as the real model's."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zimage_split.model_source import resolve_model

    folder = root / f"tiny-wide-{hidden_size}"
    shutil.copytree(resolve_model("tiny").location, folder)
    torch.manual_seed(0)
    text_config = Qwen3Config.from_pretrained(folder / "text_encoder")
    text_config.hidden_size = hidden_size  # the config names head_dim, so attention stays tiny
    shutil.rmtree(folder / "text_encoder")
    Qwen3Model(text_config).save_pretrained(str(folder / "text_encoder"))
    dit_config = dict(ZImageTransformer2DModel.load_config(folder / "transformer"))
    dit_config["cap_feat_dim"] = hidden_size
    shutil.rmtree(folder / "transformer")
    ZImageTransformer2DModel.from_config(dit_config).save_pretrained(str(folder / "transformer"))
    return folder


async def start_raw_server(payload: bytes, chunk_bytes: int, server_options: list) -> tuple[aio.Server, int]:
    """gRPC with no codec: handlers without (de)serializers receive and return bytes as they are."""

    async def upload(chunks: AsyncIterator[bytes], context: aio.ServicerContext) -> bytes:
        data = b"".join([chunk async for chunk in chunks])
        return len(data).to_bytes(8, "little")

    async def download(request: bytes, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        for start in range(0, len(payload), chunk_bytes):
            yield payload[start : start + chunk_bytes]

    async def upload_blake3(messages: AsyncIterator[bytes], context: aio.ServicerContext) -> bytes:
        digest, hasher, chunks = None, blake3(), []
        async for message in messages:
            if digest is None:
                digest = message.decode()
            else:
                hasher.update(message)
                chunks.append(message)
        data = b"".join(chunks)
        if hasher.hexdigest() != digest:
            await context.abort(grpc.StatusCode.DATA_LOSS, "BLAKE3 mismatch")
        return len(data).to_bytes(8, "little")

    async def download_blake3(request: bytes, context: aio.ServicerContext) -> AsyncIterator[bytes]:
        yield blake3(payload).hexdigest().encode()
        for start in range(0, len(payload), chunk_bytes):
            yield payload[start : start + chunk_bytes]

    server = aio.server(options=server_options)
    handlers = {
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Download": grpc.unary_stream_rpc_method_handler(download),
        "UploadBlake3": grpc.stream_unary_rpc_method_handler(upload_blake3),
        "DownloadBlake3": grpc.unary_stream_rpc_method_handler(download_blake3),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def median_ms(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


async def run(args: argparse.Namespace, folder: Path) -> tuple[dict, list[dict], dict]:
    """Returns the tensor's description, the timed rounds, and the separately timed steps."""
    from zimage_split.client import AsyncClient
    from zimage_split.client.aio import CHANNEL_OPTIONS
    from zimage_split.common import wire
    from zimage_split.common.server import TransportLimits
    from zimage_split.common.vocabulary import DEFAULT_TIMEOUT_SECONDS
    from zimage_split.dit_service.config import GeneratorConfig
    from zimage_split.dit_service.server import start_generator_server
    from zimage_split.encoder_service.config import EncoderConfig
    from zimage_split.encoder_service.server import start_encoder_server

    with quiet_loading():
        generator = await start_generator_server(
            GeneratorConfig(model=str(folder), encoder=None, port=0, device="cpu")
        )
        encoder = await start_encoder_server(
            EncoderConfig(
                model=str(folder), port=0, device="cpu", dtype="bfloat16", max_sequence_length=args.tokens
            )
        )
    client = AsyncClient(generator=f"127.0.0.1:{generator.port}", encoder=f"127.0.0.1:{encoder.port}")
    raw_server: aio.Server | None = None
    raw_channel: aio.Channel | None = None
    try:
        # The encode path sends the encoder's real output (bfloat16, its default); upload sends the same.
        embedding = (await client.encode(PROMPT))[0].tensor
        if tuple(embedding.shape) != (args.tokens, HIDDEN_SIZE) or embedding.dtype != torch.bfloat16:
            raise RuntimeError(
                f"expected a [{args.tokens}, {HIDDEN_SIZE}] bfloat16 embedding, not {embedding}"
            )
        meta, view = wire.describe(embedding)
        payload = bytes(view)
        expected_key = wire.embedding_key(meta)
        raw_server, raw_port = await start_raw_server(
            payload, wire.CHUNK_BYTES, TransportLimits().grpc_options()
        )
        raw_channel = aio.insecure_channel(f"127.0.0.1:{raw_port}", options=CHANNEL_OPTIONS)
        raw_upload = raw_channel.stream_unary(f"/{RAW_SERVICE}/Upload")
        raw_download = raw_channel.unary_stream(f"/{RAW_SERVICE}/Download")
        raw_upload_blake3 = raw_channel.stream_unary(f"/{RAW_SERVICE}/UploadBlake3")
        raw_download_blake3 = raw_channel.unary_stream(f"/{RAW_SERVICE}/DownloadBlake3")

        async def ours_upload() -> None:
            if await client.upload(embedding) != expected_key:
                raise RuntimeError("the generator answered another embedding key")

        async def ours_encode() -> None:
            item = (await client.encode(PROMPT))[0]
            if not item.cache_hit or item.tensor.shape != embedding.shape:
                raise RuntimeError("the encoder did not answer from its cache")

        async def raw_upload_once() -> None:
            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, len(payload), wire.CHUNK_BYTES):
                    yield payload[start : start + wire.CHUNK_BYTES]

            # The SDK always sends a deadline; so does the raw client.
            reply = await raw_upload(chunks(), timeout=DEFAULT_TIMEOUT_SECONDS)
            if int.from_bytes(reply, "little") != len(payload):
                raise RuntimeError("the raw server received another byte count")

        async def raw_download_once() -> None:
            call = raw_download(b"", timeout=DEFAULT_TIMEOUT_SECONDS)
            if len(b"".join([chunk async for chunk in call])) != len(payload):
                raise RuntimeError("the raw client received another byte count")

        async def raw_upload_blake3_once() -> None:
            async def messages() -> AsyncIterator[bytes]:
                yield blake3(payload).hexdigest().encode()
                for start in range(0, len(payload), wire.CHUNK_BYTES):
                    yield payload[start : start + wire.CHUNK_BYTES]

            reply = await raw_upload_blake3(messages(), timeout=DEFAULT_TIMEOUT_SECONDS)
            if int.from_bytes(reply, "little") != len(payload):
                raise RuntimeError("the raw server received another byte count")

        async def raw_download_blake3_once() -> None:
            call = raw_download_blake3(b"", timeout=DEFAULT_TIMEOUT_SECONDS)
            digest, hasher, chunks = None, blake3(), []
            async for message in call:
                if digest is None:
                    digest = message.decode()
                else:
                    hasher.update(message)
                    chunks.append(message)
            if hasher.hexdigest() != digest or len(b"".join(chunks)) != len(payload):
                raise RuntimeError("the raw client received other bytes")

        calls: dict[str, dict[str, Callable[[], Awaitable[None]]]] = {
            "upload": {"ours": ours_upload, "raw": raw_upload_once, "raw_blake3": raw_upload_blake3_once},
            "encode": {"ours": ours_encode, "raw": raw_download_once, "raw_blake3": raw_download_blake3_once},
        }

        async def timed(call: Callable[[], Awaitable[None]]) -> dict:
            start = clock()
            for _ in range(args.transfers):
                await call()
            timing = since(start)
            return timing | {
                "mb_per_s": args.transfers * len(payload) / timing["wall_s"] / 1e6,
                "ms_per_transfer": timing["wall_s"] / args.transfers * 1e3,
            }

        rounds = []
        for index in range(-args.warmup, args.rounds):  # negative indices are warm-up
            order = SIDES if index % 2 == 0 else SIDES[::-1]
            row: dict = {"round": index + 1, "order": list(order)}
            for path, sides in calls.items():
                timings = {side: await timed(sides[side]) for side in order}
                row[path] = timings | {"ratio": timings["ours"]["mb_per_s"] / timings["raw"]["mb_per_s"]}
            label = "warm-up" if index < 0 else f"round {index + 1}/{args.rounds}"
            figures = "  ".join(
                f"{path}: ours {row[path]['ours']['mb_per_s']:4.0f} raw {row[path]['raw']['mb_per_s']:4.0f} "
                f"raw+blake3 {row[path]['raw_blake3']['mb_per_s']:4.0f} MB/s ({row[path]['ratio']:.2f})"
                for path in calls
            )
            print(f"{label:>12}: {figures}", flush=True)
            if index >= 0:
                rounds.append(row)

        # What the codec and the checks cost on their own, for reading the gap (not part of the ratio).
        repeats = max(3, args.transfers)
        store, text_encoder = generator.servicer.store, encoder.servicer.encoder
        steps = {
            "blake3_one_side_ms": median_ms(lambda: blake3(view).hexdigest(), repeats),
            # The checksum before BLAKE3, for comparison.
            "sha256_one_side_ms": median_ms(lambda: hashlib.sha256(view).hexdigest(), repeats),
            "validate_embedding_ms": median_ms(lambda: store.check(embedding, "embedding"), repeats),
            "torch_threads": torch.get_num_threads(),
            "tokenize_prompt_ms": median_ms(
                lambda: text_encoder.tokenize(PROMPT, hidden_layer=-2, max_sequence_length=args.tokens),
                repeats,
            ),
        }
    finally:
        if raw_channel is not None:
            await raw_channel.close()
        if raw_server is not None:
            await raw_server.stop(0)
        await client.close()
        await encoder.stop(grace=0)
        await generator.stop(grace=0)
    tensor = {
        "shape": list(embedding.shape),
        "dtype": "bfloat16",
        "bytes": len(payload),
        "chunk_bytes": wire.CHUNK_BYTES,
        "chunks": -(-len(payload) // wire.CHUNK_BYTES),
    }
    return tensor, rounds, steps


def throughput_summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def path_summary(rounds: list[dict], path: str) -> dict:
    figures: dict = dict(PATHS[path])
    for side in SIDES:
        figures[f"{side}_mb_per_s"] = throughput_summary([r[path][side]["mb_per_s"] for r in rounds])
        figures[f"{side}_ms_per_transfer_median"] = statistics.median(
            r[path][side]["ms_per_transfer"] for r in rounds
        )
        # Process CPU seconds: the clients and the servers all run in this process.
        figures[f"{side}_cpu_s_per_round"] = summary([r[path][side]["cpu_s"] for r in rounds])
    ratios = [r[path]["ratio"] for r in rounds]
    ratio = figures["ours_mb_per_s"]["median"] / figures["raw_mb_per_s"]["median"]
    return figures | {
        "ratio_of_medians": ratio,
        "ratio_per_round": ratios,
        "ratio_per_round_median": statistics.median(ratios),
        "target_met": ratio >= TARGET_RATIO,
        # Not the target: how close ours comes to raw gRPC that pays for the same BLAKE3 check.
        "ratio_to_raw_blake3": figures["ours_mb_per_s"]["median"] / figures["raw_blake3_mb_per_s"]["median"],
    }


def measure(settings: Settings, **overrides: object) -> dict:
    """Overrides: `warmup` (untimed rounds), `transfers` (per side per round), `tokens` (embedding rows)."""
    args = options(settings, DEFAULTS, QUICK, overrides)
    if args.transfers < 1 or args.tokens < 1:
        raise ValueError("transfers and tokens must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model is built locally; never reach for the hub
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as root:
        with quiet_loading():
            folder = build_wide_model(Path(root), HIDDEN_SIZE)
        tensor, rounds, steps = asyncio.run(run(args, folder))

    paths = {path: path_summary(rounds, path) for path in PATHS}
    result = {
        "benchmark": "transfer",
        "description": "embedding transfer throughput on loopback (MB/s, 1e6 bytes per MB): the SDK's upload "
        "to the generator and the encoder's Encode stream from its cache, each against raw gRPC bytes (no "
        "codec) in the same direction, with the same 1 MiB chunks and channel options; raw_blake3 (raw plus "
        "the same BLAKE3 check) is there to read the gap, not for the target",
        "machine": machine | {"load_average_at_end": list(os.getloadavg())},
        "model": "the tiny random model widened to hidden size and cap_feat_dim 2560, in a temporary folder "
        f"(the weights play no part in a transfer; --model {settings.model!r} is not used)",
        "settings": {
            "rounds": args.rounds,
            "warmup_rounds": args.warmup,
            "transfers_per_side_per_round": args.transfers,
            "tokens": args.tokens,
            "quick": settings.quick,
            "device": "cpu: a transfer is CPU work wherever the DiT runs",
            "order": f"each path's sides back to back: {', '.join(SIDES)} in odd rounds, reversed in even ones",
            "tensor": tensor,
        },
        "paths": paths,
        # Timed alone after the rounds, to read the gap between the sides; not subtracted from anything.
        "steps_timed_alone": steps,
        "others_cpu_share_median": statistics.median(
            r[path][side]["others_cpu_share"] or 0.0 for r in rounds for path in PATHS for side in SIDES
        ),
        "rounds": rounds,
        "target": f"ours / raw >= {TARGET_RATIO} (ratio of the median MB/s) on each path",
        "target_met": all(figures["target_met"] for figures in paths.values()),
    }
    result["headline"] = headline(result)
    return result


def headline(result: dict) -> list[dict]:
    shape = "x".join(str(dim) for dim in result["settings"]["tensor"]["shape"])
    rows = []
    for path, label in (("upload", "upload to the generator"), ("encode", "Encode from the encoder's cache")):
        figures = result["paths"][path]
        rows.append(
            headline_row(
                "transfer",
                f"embedding transfer, {label}, {shape} bfloat16, loopback",
                unit="MB/s",
                ours=figures["ours_mb_per_s"]["median"],
                baseline=figures["raw_mb_per_s"]["median"],
                baseline_name="raw gRPC bytes, same chunks and direction",
                ratio=figures["ratio_of_medians"],
                ratio_meaning="ours / raw (higher is better)",
                target=f">= {TARGET_RATIO}",
                target_met=figures["target_met"],
                note=f"{figures['direction']}; median per-round ratio {figures['ratio_per_round_median']:.3f}; "
                f"raw with the same BLAKE3 check {figures['raw_blake3_mb_per_s']['median']:.0f} MB/s",
            )
        )
    return rows


def print_table(result: dict) -> None:
    print(
        f"\n{'path':<8} {'ours MB/s':>10} {'raw MB/s':>10} {'ratio':>7}  {'target':<12} {'raw+blake3 MB/s':>16}"
    )
    for path, figures in result["paths"].items():
        met = f">= {TARGET_RATIO} " + ("met" if figures["target_met"] else "not met")
        print(
            f"{path:<8} {figures['ours_mb_per_s']['median']:10.1f} {figures['raw_mb_per_s']['median']:10.1f} "
            f"{figures['ratio_of_medians']:7.3f}  {met:<12} {figures['raw_blake3_mb_per_s']['median']:16.1f}"
        )
    steps = result["steps_timed_alone"]
    print(
        f"timed alone: blake3 {steps['blake3_one_side_ms']:.2f} ms (one side; sha256 "
        f"{steps['sha256_one_side_ms']:.2f}), validate_embedding "
        f"{steps['validate_embedding_ms']:.2f} ms ({steps['torch_threads']} torch threads), tokenize "
        f"{steps['tokenize_prompt_ms']:.2f} ms"
    )


def main() -> None:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (1)")
        parser.add_argument("--transfers", type=int, default=None, help="transfers per side per round (10)")
        parser.add_argument("--tokens", type=int, default=None, help="embedding rows (512; 16 with --quick)")

    settings, overrides, out = standalone(__doc__, "transfer", flags)
    result = measure(settings, **overrides)
    print_table(result)
    print(f"wrote {write_json(result, out, 'transfer')}")


if __name__ == "__main__":
    main()
