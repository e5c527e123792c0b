"""Fuzzing of everything that crosses a trust boundary: the tensor wire codec, request messages, request
validation, embeddings and prompt files, and raw request bodies sent to the real servers.

Every example must end in success or one of our typed errors (never IndexError, RuntimeError, a
protobuf or safetensors internal...), in bounded time (hypothesis' deadline) and bounded memory
(tracemalloc: a header that claims a huge tensor must not make us allocate it). Runs are derandomized,
so CI sees the same examples every time.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from blake3 import blake3
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from zimage_split._proto.encoder.v1 import encoder_pb2
from zimage_split._proto.generator.v1 import generator_pb2
from zimage_split._proto.tensor.v1 import tensor_pb2
from zimage_split.batch_jobs import read_prompt_file
from zimage_split.client import Client
from zimage_split.client.embeddings import FILE_FORMAT, Embeddings, PromptEmbedding
from zimage_split.common import wire
from zimage_split.common.errors import ZSplitError
from zimage_split.dit_service.config import Limits
from zimage_split.dit_service.controlnets import ControlNetInfo
from zimage_split.dit_service.embedding_store import EmbeddingStore, TextPrompt, UploadedPrompt
from zimage_split.dit_service.engine import EngineInfo, GenerationJob
from zimage_split.dit_service.servicer import GeneratorServicer, request_fingerprint
from zimage_split.dit_service.validation import validate_embedding, validate_params
from zimage_split.dit_service.worker import WorkerResult
from zimage_split.encoder_service.config import MAX_PROMPT_BYTES
from zimage_split.encoder_service.engine import TextEncoder
from zimage_split.encoder_service.servicer import EncoderServicer
from zimage_split.model_source import resolve_model

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
# The most one example may allocate (Python allocations, as tracemalloc sees them).
PEAK_LIMIT = 64 * MiB
# The statuses our typed errors may travel as when the input is bad.
INPUT_ERROR_CODES = {"INVALID_ARGUMENT", "DATA_LOSS", "NOT_FOUND", "RESOURCE_EXHAUSTED"}
CAPTION_DIM = 16  # the tiny model's text hidden size
MODEL_ID = "zimage-split/tiny"


def fuzz_settings(max_examples: int, deadline_seconds: float = 2.0) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=timedelta(seconds=deadline_seconds),
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


class Target:
    """Runs one fuzz target's examples: counts them and their outcomes, and bounds each one's allocations."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.examples = 0
        self.largest_peak = 0
        self.outcomes: Counter[str] = Counter()

    def run(self, call: Callable[[], Any]) -> str:
        """Runs `call`; its outcome is "ok", the label it returns (a str), or the typed error's code."""
        # Traced only around the call: tracing hypothesis' own work would triple the run time.
        tracemalloc.start()
        try:
            result = call()
            outcome = result if isinstance(result, str) else "ok"
        except ZSplitError as error:
            assert error.code in INPUT_ERROR_CODES, f"{type(error).__name__} travels as {error.code}: {error}"
            assert error.message.strip(), f"{type(error).__name__} without a message"
            outcome = error.code
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        self.examples += 1
        self.largest_peak = max(self.largest_peak, peak)
        self.outcomes[outcome] += 1
        assert peak < PEAK_LIMIT, f"{self.name}: one example allocated {peak / MiB:.1f} MiB"
        return outcome

    def record(self, figures) -> None:  # type: ignore[no-untyped-def]
        assert self.examples > 0, f"{self.name}: hypothesis ran no examples"
        outcomes = ", ".join(f"{code} {count}" for code, count in sorted(self.outcomes.items()))
        figures.record("Fuzzing", f"{self.name}: examples", self.examples, note=outcomes)
        figures.record(
            "Fuzzing", f"{self.name}: largest allocation peak", round(self.largest_peak / MiB, 3), "MiB"
        )


@pytest.fixture
def fuzz(figures) -> Iterator[Callable[[str], Target]]:  # type: ignore[no-untyped-def]
    """`fuzz("name")` gives that name's Target; its figures are recorded after the test."""
    targets: dict[str, Target] = {}

    def make(name: str) -> Target:
        # hypothesis runs every example of a test with the same fixture, so examples share the Target.
        return targets.setdefault(name, Target(name))

    assert not tracemalloc.is_tracing(), "each example starts and stops tracemalloc itself"
    yield make
    for target in targets.values():
        target.record(figures)


# ---- Strategies ----------------------------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT32 = st.integers(0, 2**32 - 1)
dtype_codes = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(-(2**31), 2**31 - 1))
dims = st.one_of(
    st.integers(0, 8),
    st.sampled_from([16, 512, 2**31, 2**32, 2**62, 2**63 - 1, -1]),
    INT64,
)
shapes = st.one_of(
    st.lists(dims, max_size=4),
    st.lists(dims, max_size=80),
    st.lists(st.sampled_from([0, 1, 2**40, 2**63 - 1]), min_size=60, max_size=200),
)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
EMPTY_BLAKE3 = blake3(b"").hexdigest()
# For TensorHeader.blake3 and the legacy TensorHeader.sha256 alike.
hex_digests = st.one_of(
    st.just(EMPTY_SHA256),
    st.just(EMPTY_BLAKE3),
    st.binary(min_size=32, max_size=32).map(lambda raw: raw.hex()),
    st.binary(min_size=32, max_size=32).map(lambda raw: raw.hex().upper()),
    st.text(min_size=64, max_size=64),
    st.text(max_size=100),
)


@st.composite
def tensor_headers(draw: st.DrawFn) -> tensor_pb2.TensorHeader:
    """Half plausible headers (known dtype, small shape), half anything."""
    plausible = draw(st.booleans())
    code = draw(st.sampled_from([1, 2, 3]) if plausible else dtype_codes)
    shape = draw(st.lists(st.integers(0, 64), min_size=1, max_size=3) if plausible else shapes)
    itemsize = {tensor_pb2.DTYPE_BFLOAT16: 2, tensor_pb2.DTYPE_FLOAT16: 2}.get(code, 4)
    consistent = math.prod(shape) * itemsize
    byte_length = draw(
        st.one_of(
            st.just(consistent),
            st.integers(0, 2**64 - 1),
            st.sampled_from([0, 1, wire.MAX_TENSOR_BYTES, wire.MAX_TENSOR_BYTES + 1, 2**64 - 1]),
        )
    )
    if not 0 <= byte_length < 2**64:  # uint64 on the wire
        byte_length = 0
    header = tensor_pb2.TensorHeader(
        byte_length=byte_length, blake3=draw(hex_digests), sha256=draw(st.just("") | hex_digests)
    )
    header.dtype = code  # type: ignore[assignment]  # proto3 enums are open: unknown codes arrive as ints
    header.shape.extend(shape)
    return header


@st.composite
def valid_tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    values = draw(
        st.lists(st.floats(width=16, allow_nan=True), min_size=math.prod(shape), max_size=math.prod(shape))
    )
    return torch.tensor(values, dtype=torch.float32).reshape(shape).to(dtype)


# ---- 1. The tensor wire codec ---------------------------------------------------------------------------


def header_for(shape: list[int], *, blake3: str = EMPTY_BLAKE3) -> tensor_pb2.TensorHeader:
    """A float32 header whose byte_length matches `shape`."""
    return tensor_pb2.TensorHeader(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=shape, byte_length=math.prod(shape) * 4, blake3=blake3
    )


# Before the fix: a RuntimeError from torch (strides overflow), and a 256 MiB allocation for a bare header.
@example(header=header_for([0, 2**40, 2**40, 2**40]))
@example(header=header_for([wire.MAX_TENSOR_BYTES // 4 // CAPTION_DIM, CAPTION_DIM]))
@fuzz_settings(max_examples=500)
@given(header=tensor_headers())
def test_meta_from_proto_accepts_or_refuses_any_header(fuzz, header: tensor_pb2.TensorHeader) -> None:  # type: ignore[no-untyped-def]
    target = fuzz("meta_from_proto on arbitrary TensorHeaders")

    def check() -> None:
        meta = wire.meta_from_proto(header)
        assert meta.byte_length <= wire.MAX_TENSOR_BYTES and all(dim >= 0 for dim in meta.shape)
        # Accepted: an assembler for it must not allocate what the header claims before bytes arrive.
        assembler = wire.TensorAssembler(meta)
        assembler.finish()

    target.run(check)


@st.composite
def chunk_streams(draw: st.DrawFn) -> tuple[tensor_pb2.TensorHeader, list[bytes]]:
    """A well-formed header for a real tensor, then its bytes cut anyhow: exact, short, long, corrupted."""
    tensor = draw(valid_tensors())
    meta, payload = wire.describe(tensor)
    data = bytes(payload)
    sent_sha256 = hashlib.sha256(data).hexdigest()  # what a sender from before BLAKE3 sent
    kind = draw(st.sampled_from(["exact", "short", "long", "flipped", "random", "huge header"]))
    if kind == "short" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "long":
        data += draw(st.binary(min_size=1, max_size=64))
    elif kind == "flipped" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif kind == "random":
        data = draw(st.binary(max_size=2 * len(data) + 8))
    header = wire.meta_to_proto(meta)
    if kind == "huge header":  # claims the most the codec accepts, then sends almost nothing
        elements = wire.MAX_TENSOR_BYTES // tensor.element_size() // CAPTION_DIM
        header.shape[:] = [elements, CAPTION_DIM]
        header.byte_length = elements * CAPTION_DIM * tensor.element_size()
    checksum = draw(st.sampled_from(["blake3", "other blake3", "sha256 only", "other sha256 only", "none"]))
    if checksum == "other blake3":
        header.blake3 = draw(hex_digests)
    elif checksum != "blake3":
        header.ClearField("blake3")
        header.sha256 = {"sha256 only": sent_sha256, "none": ""}.get(checksum) or draw(hex_digests)
    # Cut anywhere, with empty chunks in between.
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    chunks = [data[start:end] for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return header, chunks


@example(stream=(header_for([wire.MAX_TENSOR_BYTES // 4 // CAPTION_DIM, CAPTION_DIM]), [b"\0" * 64, b""]))
@fuzz_settings(max_examples=400)
@given(stream=chunk_streams())
def test_tensor_assembler_takes_any_chunk_sequence(
    fuzz, stream: tuple[tensor_pb2.TensorHeader, list[bytes]]
) -> None:  # type: ignore[no-untyped-def]
    target = fuzz("TensorAssembler on arbitrary chunk sequences")
    header, chunks = stream

    def assemble() -> None:
        assembler = wire.TensorAssembler(wire.meta_from_proto(header))
        for chunk in chunks:
            assembler.add(chunk)
        tensor = assembler.finish()
        assert list(tensor.shape) == list(header.shape) and b"".join(chunks) == bytes(
            wire.payload_view(tensor)
        )

    target.run(assemble)


def test_a_header_with_hundreds_of_thousands_of_huge_dimensions_is_refused_at_once() -> None:
    # 3.6 MB on the wire, under the 8 MiB message limit: the product of its dimensions used to take minutes
    # of CPU on the generator's event loop.
    header = tensor_pb2.TensorHeader(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2**63 - 1] * 400_000)
    started = time.perf_counter()
    with pytest.raises(ZSplitError, match="dimensions"):
        wire.meta_from_proto(header)
    assert time.perf_counter() - started < 1.0


def test_a_zero_sized_header_with_huge_dimensions_is_refused() -> None:
    # Holds no bytes, but torch.empty([0, 2**40, 2**40, 2**40]) overflows its strides (a RuntimeError).
    with pytest.raises(ZSplitError, match="over the"):
        wire.meta_from_proto(header_for([0, 2**40, 2**40, 2**40]))


# ---- 2 and 3. Request messages from arbitrary bytes, and the generator's validation ----------------------


class InfoOnlyWorker:
    """Stands in for the engine: request validation reads only `worker.info`; running a job is a test bug."""

    def __init__(self) -> None:
        self.info = EngineInfo(
            model_id=MODEL_ID,
            caption_dim=CAPTION_DIM,
            max_caption_tokens=512,
            size_multiple=16,
            dtype=torch.float32,
            device="cpu",
            parameter_count=0,
            components=("transformer", "vae", "scheduler"),
            default_shift=3.0,
            dit_layers=30,
            controlnets=(ControlNetInfo(CONTROLNET, takes_mask=True, control_layers=15),),
        )

    outstanding = 0
    failed_starts = 0

    def replica_count(self) -> int:
        return 1

    async def run(self, job: GenerationJob, *, request_id: str = "") -> WorkerResult:
        raise AssertionError("validation must not run the engine")

    def close(self) -> None:
        pass


# The servicer loads one ControlNet and holds one uploaded control image, 96x64 (3:2), so ControlNet requests
# reach the checks of name, scale, shape and size.
CONTROLNET = "cn"


def _control_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (10, 200, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


CONTROL_PNG = _control_png()
CONTROL_KEY = "img-" + hashlib.sha256(CONTROL_PNG).hexdigest()


@pytest.fixture(scope="module")
def generator_servicer() -> GeneratorServicer:
    store = EmbeddingStore(None, caption_dim=CAPTION_DIM, max_tokens=512, cache_bytes=1 << 20)
    servicer = GeneratorServicer(InfoOnlyWorker(), store, Limits())
    assert servicer.images.add(CONTROL_PNG, mask=False, max_pixels=1 << 20)[0] == CONTROL_KEY
    return servicer


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


floats32 = st.one_of(
    st.floats(width=32), st.sampled_from([0.0, -0.0, 1.0, 30.0, 30.000002, math.nan, math.inf, -math.inf])
)
sides = st.one_of(
    st.sampled_from([0, 16, 64, 512, 1024, 2048, 4096, 4112, 1000]),
    st.integers(4, 256).map(lambda n: n * 16),
    UINT32,
)
conditionings = st.one_of(
    st.none(),
    st.builds(generator_pb2.Conditioning),
    st.builds(generator_pb2.Conditioning, text=st.text(max_size=50)),
    st.builds(generator_pb2.Conditioning, embedding_key=st.text(max_size=70)),
)


@st.composite
def generate_requests(draw: st.DrawFn) -> generator_pb2.GenerateRequest:
    fields: dict[str, Any] = {
        "request_id": draw(st.text(max_size=20)),
        "model": draw(st.one_of(st.just(""), st.just(MODEL_ID), st.text(max_size=30))),
        "cfg_normalization": draw(floats32),
        "seed": draw(optional(st.integers(0, 2**64 - 1))),
        "width": draw(optional(sides)),
        "height": draw(optional(sides)),
        "steps": draw(optional(st.one_of(st.integers(0, 101), UINT32))),
        "guidance_scale": draw(optional(floats32)),
        "cfg_truncation": draw(optional(floats32)),
        "shift": draw(optional(floats32)),
        "passes": draw(
            st.lists(
                st.builds(
                    generator_pb2.Pass,
                    scale=floats32,
                    steps=optional(st.integers(0, 200)),
                    strength=optional(floats32),
                ),
                max_size=5,
            )
        ),
        "return_intermediate": draw(st.booleans()),
        "skip_layer_guidance": draw(
            optional(
                st.builds(
                    generator_pb2.SkipLayerGuidance,
                    scale=floats32,
                    layers=st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 40), max_size=8),
                    start=optional(floats32),
                    stop=optional(floats32),
                )
            )
        ),
        "dype": draw(
            optional(
                st.builds(
                    generator_pb2.Dype,
                    method=st.one_of(st.sampled_from(["", "vision_yarn", "ntk", "pi"]), st.text(max_size=12)),
                    scale=optional(floats32),
                    exponent=optional(floats32),
                )
            )
        ),
        "max_sequence_length": draw(optional(st.one_of(st.integers(0, 4097), UINT32))),
        "prompt": draw(conditionings),
        "negative_prompt": draw(conditionings),
        "loras": draw(
            st.lists(
                st.builds(generator_pb2.LoraRequest, name=st.text(max_size=20), scale=optional(floats32)),
                max_size=3,
            )
        ),
        "init_image": draw(
            optional(
                st.builds(
                    generator_pb2.InitImage,
                    image_key=st.text(max_size=70),
                    mask_key=st.text(max_size=70),
                    strength=optional(floats32),
                )
            )
        ),
        "controlnet": draw(
            optional(
                st.builds(
                    generator_pb2.ControlNetRequest,
                    name=st.one_of(st.just(CONTROLNET), st.text(max_size=20)),
                    image_key=st.one_of(st.just(CONTROL_KEY), st.text(max_size=70)),
                    conditioning_scale=optional(floats32),
                )
            )
        ),
        "long_prompt_mode": draw(st.one_of(st.integers(0, 4), st.integers(-(2**31), 2**31 - 1))),
        "output_format": draw(st.one_of(st.integers(0, 5), st.integers(-(2**31), 2**31 - 1))),
        "quality": draw(optional(st.one_of(st.integers(0, 101), UINT32))),
        "strip_metadata": draw(st.booleans()),
    }
    return generator_pb2.GenerateRequest(
        **{name: value for name, value in fields.items() if value is not None}
    )


def check_generate_request(servicer: GeneratorServicer, request: generator_pb2.GenerateRequest) -> None:
    """What Generate does with a request before any work: fingerprint it, then validate it."""
    request_fingerprint(request)
    job = servicer.validate(request)
    params, prompt, encoding, start, output = job.params, job.prompt, job.encoding, job.start, job.output
    assert 64 <= params.width <= 4096 and 64 <= params.height <= 4096 and 1 <= params.steps <= 100
    assert math.isfinite(params.guidance_scale) and 0 <= params.cfg_truncation <= 1
    # A request's shift or the model's own (3.0), never unset once validated.
    assert params.shift is not None and (0.1 <= params.shift <= 20 or params.shift == 3.0)
    if job.passes:
        assert 2 <= len(job.passes) <= 4 and (job.passes[-1].width, job.passes[-1].height) == (
            params.width,
            params.height,
        )
        assert all(64 <= plan.width <= params.width and 1 <= plan.steps <= 100 for plan in job.passes)
    slg = params.skip_layer_guidance
    assert slg is None or (
        0 < slg.scale <= 20
        and all(0 <= layer < servicer.info.dit_layers for layer in slg.layers)
        and 0 <= slg.start < slg.stop <= 1
    )
    dype = params.dype
    assert dype is None or (
        dype.method in ("vision_yarn", "ntk", "pi") and 0 <= dype.scale <= 10 and 0 <= dype.exponent <= 10
    )
    limit = servicer.info.max_caption_tokens
    max_length = encoding.max_sequence_length
    assert isinstance(prompt, TextPrompt | UploadedPrompt) and (
        max_length is None or 1 <= max_length <= limit
    )
    assert encoding.long_prompt_mode in ("truncate", "interpolate", "pool")
    assert not params.loras  # this servicer has no --lora-dir: every LoRA is refused
    assert (
        start.image is None and params.strength is None
    )  # no start image was uploaded: every key is unknown
    if (
        params.controlnet is not None
    ):  # the one loaded, with the one control image, at the output's size and shape
        assert params.controlnet == CONTROLNET and 0 <= params.controlnet_scale <= 10
        assert start.control is not None and start.control.size == (params.width, params.height)
        assert abs(params.width / params.height - 1.5) < 0.3 and not job.passes
        assert params.skip_layer_guidance is None
    else:
        assert start.control is None and params.controlnet_scale == 0
    assert output.format in ("png", "jpeg", "webp", "latent")
    assert output.quality is None or 1 <= output.quality <= 100


@fuzz_settings(max_examples=500)
@given(request=generate_requests())
def test_generate_requests_are_validated_cleanly(fuzz, generator_servicer, request) -> None:  # type: ignore[no-untyped-def]
    target = fuzz("GeneratorServicer.validate on arbitrary GenerateRequests")
    target.run(lambda: check_generate_request(generator_servicer, request))


@st.composite
def controlnet_requests(draw: st.DrawFn) -> generator_pb2.GenerateRequest:
    """Requests that name a ControlNet, most of them well-formed but for one field, so that they reach the
    checks of the ControlNet's name, scale, combinations and the control image's shape."""
    width, height = draw(
        st.one_of(
            st.just((None, None)),
            st.sampled_from([(96, 64), (192, 128), (384, 256), (480, 320), (64, 64), (128, 64), (100, 64)]),
            st.tuples(optional(sides), optional(sides)),
        )
    )
    # The valid value five times in six.
    mostly = lambda valid, *others: st.sampled_from([valid] * 5 * len(others) + list(others))  # noqa: E731
    fields: dict[str, Any] = {
        "prompt": generator_pb2.Conditioning(embedding_key="a-key"),
        "width": width,
        "height": height,
        "controlnet": generator_pb2.ControlNetRequest(
            name=draw(mostly(CONTROLNET, "other", "")),
            image_key=draw(mostly(CONTROL_KEY, "", "mask-" + "0" * 64, "img-" + "0" * 64)),
            conditioning_scale=draw(
                optional(
                    st.integers(0, 5).flatmap(lambda n: floats32 if n == 0 else st.floats(0, 10, width=32))
                )
            ),
        ),
        "guidance_scale": draw(optional(st.sampled_from([0.0, 3.0]))),
        "skip_layer_guidance": draw(mostly(None, generator_pb2.SkipLayerGuidance(scale=2.0, layers=[1]))),
        "passes": draw(mostly((), (generator_pb2.Pass(scale=0.5), generator_pb2.Pass(scale=1)))),
    }
    return generator_pb2.GenerateRequest(
        **{name: value for name, value in fields.items() if value is not None}
    )


@fuzz_settings(max_examples=300)
@given(request=controlnet_requests())
def test_controlnet_requests_are_validated_cleanly(fuzz, generator_servicer, request) -> None:  # type: ignore[no-untyped-def]
    target = fuzz("GeneratorServicer.validate on ControlNet requests")
    target.run(lambda: check_generate_request(generator_servicer, request))


any_int = st.one_of(st.none(), st.integers(-(2**70), 2**70), st.integers(-20, 5000))
any_float = st.one_of(st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]))


@fuzz_settings(max_examples=500)
@given(
    width=any_int,
    height=any_int,
    steps=any_int,
    guidance_scale=st.one_of(st.none(), any_float),
    cfg_normalization=any_float,
    cfg_truncation=st.one_of(st.none(), any_float),
    seed=st.integers(-(2**70), 2**70),
    shift=st.one_of(st.none(), any_float),
)
def test_validate_params_takes_any_numbers(  # type: ignore[no-untyped-def]
    fuzz,
    width: int | None,
    height: int | None,
    steps: int | None,
    guidance_scale: float | None,
    cfg_normalization: float,
    cfg_truncation: float | None,
    seed: int,
    shift: float | None,
) -> None:
    target = fuzz("validate_params on arbitrary numbers")

    def check() -> None:
        params = validate_params(
            Limits(),
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            cfg_normalization=cfg_normalization,
            cfg_truncation=cfg_truncation,
            seed=seed,
            shift=shift,
        )
        assert params.shift is None or 0.1 <= params.shift <= 20
        assert params.width * params.height <= Limits().max_pixels and params.width % 16 == 0
        assert all(
            math.isfinite(value)
            for value in (params.guidance_scale, params.cfg_normalization, params.cfg_truncation)
        )

    target.run(check)


@st.composite
def embedding_tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(
        st.one_of(
            st.tuples(st.integers(0, 600), st.just(CAPTION_DIM)),
            st.tuples(st.integers(1, 16), st.just(CAPTION_DIM)),
            st.lists(st.integers(0, 20), max_size=4),
            st.tuples(st.integers(1, 8), st.integers(0, 40)),
        )
    )
    tensor = torch.randn(shape).to(dtype) if math.prod(shape) else torch.empty(shape, dtype=dtype)
    flat = tensor.view(-1)
    for index, value in draw(
        st.lists(
            st.tuples(st.integers(0, 10**6), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=3
        )
    ):
        if flat.numel():
            flat[index % flat.numel()] = value
    return tensor


@fuzz_settings(max_examples=300)
@given(tensor=embedding_tensors(), max_tokens=st.sampled_from([1, 16, 512]))
def test_validate_embedding_takes_any_tensor(fuzz, tensor: torch.Tensor, max_tokens: int) -> None:  # type: ignore[no-untyped-def]
    target = fuzz("validate_embedding on random tensors")

    def check() -> None:
        validate_embedding(
            tensor, caption_dim=CAPTION_DIM, max_tokens=max_tokens, what="The fuzzed embedding"
        )
        assert tensor.dim() == 2 and tensor.shape[1] == CAPTION_DIM and bool(torch.isfinite(tensor).all())

    target.run(check)


def mutations(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and valid messages with bytes flipped, cut, inserted or spliced."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(valid))
        for _ in range(draw(st.integers(1, 4))):
            operation = draw(st.sampled_from(["flip", "cut", "insert", "splice"]))
            at = draw(st.integers(0, len(data)))
            if operation == "flip" and at < len(data):
                data[at] ^= draw(st.integers(1, 255))
            elif operation == "cut":
                data = data[:at]
            elif operation == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
            else:
                data = data[:at] + draw(valid)
        return bytes(data)

    return st.one_of(st.binary(max_size=512), valid, mutate())


generate_bodies = mutations(generate_requests().map(lambda request: request.SerializeToString()))


def parse(message_type: Any, body: bytes) -> Any:
    """The request grpc would hand to the servicer, or None where grpc's own deserializer refuses it."""
    try:
        return message_type.FromString(body)
    except DecodeError:
        return None


@fuzz_settings(max_examples=400)
@given(body=generate_bodies)
def test_generate_request_bytes_parse_or_validate_cleanly(fuzz, generator_servicer, body: bytes) -> None:  # type: ignore[no-untyped-def]
    target = fuzz("GenerateRequest.FromString then validation, on arbitrary bytes")

    def check() -> str | None:
        request = parse(generator_pb2.GenerateRequest, body)
        if request is None:
            return "undecodable"
        check_generate_request(generator_servicer, request)
        return None

    target.run(check)


@st.composite
def upload_requests(draw: st.DrawFn) -> generator_pb2.UploadEmbeddingRequest:
    if draw(st.booleans()):
        return generator_pb2.UploadEmbeddingRequest(chunk=draw(st.binary(max_size=64)))
    return generator_pb2.UploadEmbeddingRequest(
        header=generator_pb2.UploadHeader(
            tensor=draw(tensor_headers()), content_key=draw(st.text(max_size=10))
        )
    )


def check_upload_request(request: generator_pb2.UploadEmbeddingRequest) -> None:
    """What UploadEmbedding does with one message: a header is checked and opens an assembler."""
    if request.WhichOneof("item") == "header":
        meta = wire.meta_from_proto(request.header.tensor)
        wire.TensorAssembler(meta).finish()


@fuzz_settings(max_examples=400)
@given(body=mutations(upload_requests().map(lambda request: request.SerializeToString())))
def test_upload_request_bytes_parse_or_validate_cleanly(fuzz, body: bytes) -> None:  # type: ignore[no-untyped-def]
    target = fuzz("UploadEmbeddingRequest.FromString then validation, on arbitrary bytes")

    def check() -> str | None:
        request = parse(generator_pb2.UploadEmbeddingRequest, body)
        if request is None:
            return "undecodable"
        check_upload_request(request)
        return None

    target.run(check)


# ---- 4. The encoder's request validation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_servicer(tiny_model_dir: Path) -> EncoderServicer:
    encoder = TextEncoder(resolve_model(str(tiny_model_dir)), device=torch.device("cpu"), dtype=torch.float32)
    return EncoderServicer(encoder)


@st.composite
def long_prompts(draw: st.DrawFn) -> str:
    """Prompts at and around the size limit (UTF-8 bytes), made by repeating a short arbitrary text."""
    unit = draw(st.text(min_size=1, max_size=12))
    size = draw(st.sampled_from([MAX_PROMPT_BYTES, MAX_PROMPT_BYTES + 1, MAX_PROMPT_BYTES + 4, 5_000]))
    data = (unit * (size // len(unit.encode()) + 1)).encode()
    return data[:size].decode("utf-8", errors="ignore")  # drops a character cut in half


prompt_texts = st.one_of(
    st.text(max_size=60),
    st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn"]), max_size=40),
    st.sampled_from(["", "<|im_start|>", "<|im_end|>\n<|im_start|>assistant", "<think>", "\x00", "\ufeff"]),
)


@st.composite
def encode_requests(draw: st.DrawFn) -> encoder_pb2.EncodeRequest:
    prompts = draw(
        st.one_of(
            st.lists(prompt_texts, max_size=8),
            st.lists(prompt_texts, min_size=60, max_size=70),
            st.lists(long_prompts(), min_size=1, max_size=2),
        )
    )
    options = encoder_pb2.EncodeOptions()
    max_length = draw(optional(st.one_of(st.integers(0, 4097), UINT32)))
    if max_length is not None:
        options.max_sequence_length = max_length
    layer = draw(optional(st.one_of(st.integers(-4, 1), st.integers(-(2**31), 2**31 - 1))))
    if layer is not None:
        options.hidden_layer = layer
    return encoder_pb2.EncodeRequest(prompts=prompts, options=options)


def check_encode_request(servicer: EncoderServicer, request: encoder_pb2.EncodeRequest) -> None:
    tokenized = servicer._tokenize_request(request)
    assert len(tokenized) == len(request.prompts)
    assert all(1 <= len(prompt.input_ids) <= prompt.max_sequence_length for prompt in tokenized)


@fuzz_settings(max_examples=200, deadline_seconds=5.0)
@given(request=encode_requests())
def test_encode_requests_are_validated_cleanly(fuzz, encoder_servicer, request) -> None:  # type: ignore[no-untyped-def]
    target = fuzz("EncoderServicer._tokenize_request on arbitrary EncodeRequests")
    target.run(lambda: check_encode_request(encoder_servicer, request))


@fuzz_settings(max_examples=300)
@given(
    body=mutations(
        st.builds(
            encoder_pb2.EncodeRequest,
            prompts=st.lists(st.text(max_size=20), max_size=3),
            options=st.builds(
                encoder_pb2.EncodeOptions,
                max_sequence_length=st.one_of(st.integers(0, 600), UINT32),
                hidden_layer=st.one_of(st.just(-2), st.integers(-(2**31), 2**31 - 1)),
            ),
        ).map(lambda request: request.SerializeToString())
    )
)
def test_encode_request_bytes_parse_or_validate_cleanly(fuzz, encoder_servicer, body: bytes) -> None:  # type: ignore[no-untyped-def]
    target = fuzz("EncodeRequest.FromString then validation, on arbitrary bytes")

    def check() -> str | None:
        request = parse(encoder_pb2.EncodeRequest, body)
        if request is None:
            return "undecodable"
        check_encode_request(encoder_servicer, request)
        return None

    target.run(check)


# ---- 5. Files: embeddings files and prompt files --------------------------------------------------------


def valid_embeddings_file() -> bytes:
    """The bytes of a real file from Embeddings.save (fixed values, so every run damages the same file)."""
    items = [
        PromptEmbedding(
            text=text,
            content_key=f"key-{index}",
            tensor=(torch.arange(tokens * CAPTION_DIM, dtype=torch.float32) / 7)
            .reshape(tokens, -1)
            .to(dtype),
            token_count=tokens,
            truncated=False,
            formatted_text=f"<|im_start|>user\n{text}<|im_end|>",
        )
        for index, (text, tokens, dtype) in enumerate(
            [("a red fox", 3, torch.float32), ("雪中的狐狸", 2, torch.bfloat16)]
        )
    ]
    with tempfile.TemporaryDirectory() as folder:
        return Embeddings(items, model_id=MODEL_ID).save(Path(folder) / "valid.safetensors").read_bytes()


VALID_FILE = valid_embeddings_file()


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID_FILE)
    (header_length,) = struct.unpack("<Q", data[:8])
    for _ in range(draw(st.integers(1, 6))):
        # Half the damage lands in the JSON header, where the parser and our checks are exercised.
        end = 8 + header_length if draw(st.booleans()) else len(data)
        at = draw(st.integers(0, max(0, min(end, len(data)) - 1)))
        operation = draw(st.sampled_from(["flip", "flip", "cut", "insert"]))
        if operation == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif operation == "cut":
            data = data[:at]
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=12),
        st.sampled_from(["prompt.000000", "float32", "bfloat16", "0" * 64, "3", "-2"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.sampled_from(
                [
                    "tensor",
                    "text",
                    "content_key",
                    "dtype",
                    "token_count",
                    "sha256",
                    "blake3",
                    "hidden_layer",
                    "truncated",
                ]
            ),
            children,
            max_size=8,
        ),
    ),
    max_leaves=20,
)


ZEROS = torch.zeros(3, CAPTION_DIM)
GOOD_ENTRY = {
    "tensor": "prompt.000000",
    "text": "a fox",
    "content_key": "k",
    "dtype": "float32",
    "token_count": 3,
    # Version 1 files check sha256, version 2 files blake3; the other one is ignored.
    "sha256": hashlib.sha256(wire.payload_view(ZEROS)).hexdigest(),
    "blake3": blake3(wire.payload_view(ZEROS)).hexdigest(),
    "formatted_text": "",
    "hidden_layer": -2,
    "max_sequence_length": 512,
    "truncated": False,
}


def embeddings_file(
    prompts: str, *, hidden_size: str = str(CAPTION_DIM), tensor: torch.Tensor = ZEROS, version: str = "2"
) -> bytes:
    """A well-formed safetensors file with a zimage-split header holding `prompts` (JSON text)."""
    metadata = {
        "format": FILE_FORMAT,
        "format_version": version,
        "model_id": MODEL_ID,
        "hidden_size": hidden_size,
        "prompts": prompts,
    }
    return save({"prompt.000000": tensor}, metadata=metadata)


@st.composite
def odd_metadata_files(draw: st.DrawFn) -> bytes:
    """Well-formed safetensors with a zimage-split header whose fields hold anything."""
    entry: dict[str, Any] = dict(GOOD_ENTRY)
    for name in draw(st.lists(st.sampled_from(sorted(entry)), max_size=3, unique=True)):
        if draw(st.booleans()):
            del entry[name]
        else:
            entry[name] = draw(json_values)
    prompts = draw(
        st.one_of(
            st.just(json.dumps([entry])),
            json_values.map(json.dumps),
            st.just("[" * 100_000 + "]" * 100_000),
            st.just("[" + "9" * 5_000 + "]"),
            st.text(max_size=20),
        )
    )
    hidden_size = draw(st.sampled_from([str(CAPTION_DIM), "sixteen", "-1", "9" * 5_000, "", "１６"]))
    tensor = draw(
        st.sampled_from([ZEROS, torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64), torch.zeros(())])
    )
    version = draw(st.sampled_from(["1", "2"]))
    return embeddings_file(prompts, hidden_size=hidden_size, tensor=tensor, version=version)


# Each of these raised an untyped error (TypeError, ValueError, IndexError, RecursionError) before the fix.
@example(data=embeddings_file(json.dumps([{**GOOD_ENTRY, "tensor": None}])))
@example(data=embeddings_file(json.dumps(["tensor text content_key dtype token_count sha256"])))
@example(data=embeddings_file("[" * 100_000 + "]" * 100_000))
@example(data=embeddings_file(json.dumps([GOOD_ENTRY]), hidden_size="sixteen"))
@example(data=embeddings_file(json.dumps([GOOD_ENTRY]), tensor=torch.zeros(())))
@example(data=embeddings_file(json.dumps([{**GOOD_ENTRY, "text": 5}])))
@example(data=embeddings_file(json.dumps([{**GOOD_ENTRY, "token_count": "x"}])))
@example(data=embeddings_file(json.dumps([{**GOOD_ENTRY, "hidden_layer": []}])))
@fuzz_settings(max_examples=400)
@given(data=st.one_of(st.binary(max_size=256), damaged_files(), odd_metadata_files()))
def test_embeddings_files_load_or_are_refused_cleanly(fuzz, tmp_path: Path, data: bytes) -> None:  # type: ignore[no-untyped-def]
    target = fuzz("Embeddings.load on damaged files")
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(data)

    def check() -> None:
        loaded = Embeddings.load(path)
        assert all(item.tensor.dim() == 2 for item in loaded)

    target.run(check)


def test_the_valid_embeddings_files_load(tmp_path: Path) -> None:
    path = tmp_path / "valid.safetensors"
    path.write_bytes(VALID_FILE)
    assert [item.text for item in Embeddings.load(path)] == ["a red fox", "雪中的狐狸"]
    for version in ("1", "2"):
        path.write_bytes(embeddings_file(json.dumps([GOOD_ENTRY]), version=version))
        assert Embeddings.load(path)[0].hidden_layer == -2


json_lines = st.one_of(
    st.binary(max_size=80),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.builds(lambda text: json.dumps({"prompt": text}).encode(), st.text(max_size=20)),
    st.sampled_from(
        [
            b"[" * 50_000 + b"]" * 50_000,
            b'{"prompt": ' * 20_000,
            b"9" * 5_000,
            b'{"prompt": "\\ud800"}',
            b"\xef\xbb\xbf" + b'"bom"',
            b"\xff\xfe",
            b"\r",
            b"  \t",
            b"NaN",
        ]
    ),
)
prompt_files = st.one_of(
    st.binary(max_size=512), st.lists(json_lines, max_size=6).map(lambda lines: b"\n".join(lines))
)


# Each of these raised RecursionError or ValueError, or returned a prompt no request can carry, before the fix.
@example(data=b"[" * 50_000 + b"]" * 50_000, suffix=".jsonl")
@example(data=b"9" * 5_000, suffix=".jsonl")
@example(data=b'{"prompt": "\\ud800"}', suffix=".jsonl")
@fuzz_settings(max_examples=400)
@given(data=prompt_files, suffix=st.sampled_from([".txt", ".jsonl", ".ndjson"]))
def test_prompt_files_read_or_are_refused_cleanly(fuzz, tmp_path: Path, data: bytes, suffix: str) -> None:  # type: ignore[no-untyped-def]
    target = fuzz("read_prompt_file on arbitrary bytes")
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(data)

    def check() -> None:
        prompts = read_prompt_file(path, warn=lambda message: None)
        assert prompts and all(isinstance(prompt, str) for prompt in prompts)
        for prompt in prompts:
            prompt.encode("utf-8")  # what an EncodeRequest will need of it
            assert suffix != ".txt" or prompt.strip()  # a JSONL line may ask for "" on purpose

    target.run(check)


# ---- 6. Raw request bodies to the real servers ----------------------------------------------------------

GENERATE = "/zimage.generator.v1.GeneratorService/Generate"
UPLOAD = "/zimage.generator.v1.GeneratorService/UploadEmbedding"
ENCODE = "/zimage.encoder.v1.EncoderService/Encode"
CALL_TIMEOUT = 2.0


def would_generate(servicer: GeneratorServicer, body: bytes) -> bool:
    """A body that is a valid request for a text prompt would run a real image (up to 2048²): skip it."""
    request = parse(generator_pb2.GenerateRequest, body)
    if request is None:
        return False
    try:
        job = servicer.validate(request)
    except ZSplitError:
        return False
    return isinstance(job.prompt, TextPrompt) or isinstance(job.negative, TextPrompt)


def status_of(call: Callable[[], Any]) -> str:
    try:
        call()
    except grpc.RpcError as error:
        return str(error.code().name)  # type: ignore[attr-defined]
    return "OK"


raw_bodies = st.one_of(
    generate_bodies,
    mutations(upload_requests().map(lambda request: request.SerializeToString())),
    st.binary(max_size=512),
)
# A body that does not parse as the method's message is INVALID_ARGUMENT: ErrorMappingInterceptor parses
# single requests itself (gRPC would answer UNKNOWN) and maps a DecodeError from a request stream.
UNDECODABLE_CODES = {"INVALID_ARGUMENT"}


def test_raw_request_bodies_get_a_status_and_the_servers_keep_serving(  # type: ignore[no-untyped-def]
    generator, encoder_fp32, figures
) -> None:
    results: Counter[str] = Counter()
    undecodable: Counter[str] = Counter()
    sent = 0
    with (
        grpc.insecure_channel(f"127.0.0.1:{generator.port}") as generator_channel,
        grpc.insecure_channel(f"127.0.0.1:{encoder_fp32.port}") as encoder_channel,
    ):
        # No serializers: the bodies go out exactly as given.
        generate = generator_channel.unary_stream(GENERATE)
        upload = generator_channel.stream_unary(UPLOAD)
        encode = encoder_channel.unary_stream(ENCODE)

        @fuzz_settings(max_examples=200, deadline_seconds=3 * CALL_TIMEOUT + 2)
        @given(body=raw_bodies, upload_messages=st.integers(1, 3))
        def send(body: bytes, upload_messages: int) -> None:
            nonlocal sent
            sent += 1
            calls: list[tuple[str, str, Any]] = []
            if would_generate(generator.servicer, body):
                results["skipped"] += 1
            else:
                code = status_of(lambda: list(generate(body, timeout=CALL_TIMEOUT)))
                calls.append(("Generate", code, generator_pb2.GenerateRequest))
            code = status_of(lambda: upload(iter([body] * upload_messages), timeout=CALL_TIMEOUT))
            calls.append(("UploadEmbedding", code, generator_pb2.UploadEmbeddingRequest))
            code = status_of(lambda: list(encode(body, timeout=CALL_TIMEOUT)))
            calls.append(("Encode", code, encoder_pb2.EncodeRequest))
            for method, code, message_type in calls:
                results[code] += 1
                if parse(message_type, body) is None:
                    undecodable[f"{method} {code}"] += 1
                    assert code in UNDECODABLE_CODES, f"{method}: {code} for an undecodable body {body!r}"
                else:
                    # Whatever parses is ours to judge: a typed status, never UNKNOWN or a logged INTERNAL.
                    assert code not in ("UNKNOWN", "INTERNAL"), f"{method}: {code} for parsable body {body!r}"

        send()

    for port in (generator.port, encoder_fp32.port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    address = {"generator": f"127.0.0.1:{generator.port}", "encoder": f"127.0.0.1:{encoder_fp32.port}"}
    with Client(**address, timeout=60) as client:
        assert client.generate("still alive", seed=0, width=64, height=64, steps=1).size == (64, 64)
        assert client.encode(["still alive"])[0].tensor.shape[1] == CAPTION_DIM

    skipped = results.pop("skipped", 0)
    codes = ", ".join(f"{code} {count}" for code, count in sorted(results.items()))
    figures.record("Fuzzing", "raw bodies over the wire: bodies", sent)
    figures.record("Fuzzing", "raw bodies over the wire: calls", sum(results.values()), note=codes)
    figures.record(
        "Fuzzing",
        "raw bodies over the wire: Generate bodies not sent",
        skipped,
        note="valid requests for a text prompt, which would run a full image",
    )
    figures.record(
        "Fuzzing",
        "raw bodies over the wire: undecodable bodies",
        sum(undecodable.values()),
        note=", ".join(f"{key} {count}" for key, count in sorted(undecodable.items())),
    )


@pytest.mark.parametrize(
    ("method", "server"), [(GENERATE, "generator"), (UPLOAD, "generator"), (ENCODE, "encoder_fp32")]
)
def test_an_undecodable_body_is_invalid_argument(method: str, server: str, request) -> None:  # type: ignore[no-untyped-def]
    port = request.getfixturevalue(server).port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        if method == UPLOAD:
            code = status_of(lambda: channel.stream_unary(method)(iter([b"\x00"]), timeout=CALL_TIMEOUT))
        else:
            code = status_of(lambda: list(channel.unary_stream(method)(b"\x00", timeout=CALL_TIMEOUT)))
    assert code == "INVALID_ARGUMENT"
