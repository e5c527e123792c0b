"""Bad input, one table: every RPC, the CLI and the files it reads each get their exact status code and a
message that says the fix; the servers keep serving, and 1,000 bad requests leak no fds, threads or memory.

The servers are real `zsplit serve` processes with small limits and a bearer token, so every limit flag is
exercised and every RPC has a wrong-token case. CLI cases run `zimage_split.cli.main` in-process with the
model loaders replaced by a trap: a flag or file the CLI could have refused must fail before a model loads.
Images and LoRA files are not inputs yet (a later issue); their cases belong here once they are.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors import safe_open
from safetensors.torch import save

from tests.reliability.conftest import Figures
from tests.reliability.processes import ProcessStats, ServiceProcess, free_port, health_status
from zimage_split import cli
from zimage_split._proto.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from zimage_split._proto.generator.v1 import generator_pb2, generator_pb2_grpc
from zimage_split._proto.tensor.v1 import tensor_pb2
from zimage_split.client import Client
from zimage_split.client.embeddings import Embeddings, PromptEmbedding
from zimage_split.common import wire
from zimage_split.common.security import ClientSecurity

pytestmark = pytest.mark.timeout(600)

SECTION = "Bad input"
TOKEN = "bad-input-table-token"
WRONG_TOKEN = (("authorization", "Bearer not-the-token"),)
NO_TOKEN: tuple[tuple[str, str], ...] = ()
RPC_TIMEOUT = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
MiB = 1 << 20
# Over both servers' --max-message-mb 2, under nothing else.
OVERSIZED = 2 * MiB + 64 * 1024

# Deliberately small limits, so that going over them is cheap. The generator takes longer prompts than the
# encoder, so a prompt between the two limits shows the encoder's refusal travelling through the generator.
ENCODER_FLAGS = ["--dtype", "float32", "--max-prompt-bytes", "1000", "--max-prompts-per-request", "8"]
ENCODER_FLAGS += ["--max-message-mb", "2"]
GENERATOR_FLAGS = ["--max-pixels", "262144", "--max-steps", "20", "--max-prompt-bytes", "2000"]
GENERATOR_FLAGS += ["--max-message-mb", "2"]
GENERATOR_SERVICE = "zimage.generator.v1.GeneratorService"
ENCODER_SERVICE = "zimage.encoder.v1.EncoderService"
REUSED_ID = "bad-input-table-reused-id"
# The ControlNet the generator loads (a tiny random one).
CONTROLNET = "cn"

# What each case aims at, in the order of the figures.
TARGETS = (
    "Generate",
    "UploadEmbedding",
    "UploadImage",
    "ListLoras",
    "GeneratorService.Info",
    "Encode",
    "EncoderService.Info",
    "Health/Check",
    "CLI flags",
    "config file",
    "embeddings file",
    "prompt file",
    "PEM file",
    "token file",
    "output path",
)
RPC_TARGETS = TARGETS[:8]


# ---- The servers ---------------------------------------------------------------------------------------


@dataclass
class Servers:
    """Both services as processes, one channel to each (reused by every case), and what the cases need."""

    generator: ServiceProcess
    encoder: ServiceProcess
    channels: dict[str, grpc.Channel]
    held_key: str = ""
    auth: ClassVar[tuple[tuple[str, str], ...]] = (("authorization", f"Bearer {TOKEN}"),)

    @property
    def gen(self) -> generator_pb2_grpc.GeneratorServiceStub:
        return generator_pb2_grpc.GeneratorServiceStub(self.channels["generator"])

    @property
    def enc(self) -> encoder_pb2_grpc.EncoderServiceStub:
        return encoder_pb2_grpc.EncoderServiceStub(self.channels["encoder"])

    def processes(self) -> tuple[ServiceProcess, ServiceProcess]:
        return self.generator, self.encoder

    def assert_serving(self, after: str) -> None:
        for process in self.processes():
            alive = process.process.poll() is None
            if not (alive and health_status(process.port) == SERVING):
                state = "is not SERVING" if alive else "died"
                raise AssertionError(
                    f"{process.service} {state} after {after}:\n{process.log_text()[-4000:]}"
                )


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad-input-token") / "token.txt"
    path.write_text(TOKEN + "\n")
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return path


@pytest.fixture(scope="module")
def servers(
    tiny_model_dir: Path, token_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    from zimage_split.tiny_model import build_tiny_controlnet

    controlnet = build_tiny_controlnet(tmp_path_factory.mktemp("bad-input-controlnet") / "cn.safetensors")
    with ExitStack() as stack:
        token = ("--auth-token-file", str(token_file))
        encoder = stack.enter_context(ServiceProcess("encoder", tiny_model_dir, *ENCODER_FLAGS, *token))
        # One after the other: a generator that starts first finds the encoder down, and its channel's
        # reconnect backoff can outlast --encoder-retries on the first text prompt (UNAVAILABLE).
        encoder.wait_serving()
        generator = stack.enter_context(
            ServiceProcess(
                "generator",
                tiny_model_dir,
                "--encoder",
                encoder.address,
                "--encoder-auth-token-file",
                str(token_file),
                *GENERATOR_FLAGS,
                "--controlnet",
                f"{CONTROLNET}={controlnet}",
                *token,
            )
        )
        generator.wait_serving()
        channels = {
            process.service: stack.enter_context(grpc.insecure_channel(process.address))
            for process in (generator, encoder)
        }
        running = Servers(generator, encoder, channels)
        # An embedding the generator holds, and one finished request whose id the reuse case sends again.
        running.held_key = running.gen.UploadEmbedding(
            iter(upload_messages(valid_tensor())), timeout=RPC_TIMEOUT, metadata=running.auth
        ).embedding_key
        list(
            running.gen.Generate(
                generator_pb2.GenerateRequest(
                    request_id=REUSED_ID,
                    prompt=generator_pb2.Conditioning(embedding_key=running.held_key),
                    width=64,
                    height=64,
                    steps=1,
                    seed=1,
                ),
                timeout=RPC_TIMEOUT,
                metadata=running.auth,
            )
        )
        yield running


# ---- Cases ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: str
    message: str


@dataclass
class Bench:
    """What a case's action may use; the servers and files are made only when a case asks for them."""

    request: pytest.FixtureRequest | None = None
    tmp_path: Path | None = None
    capsys: pytest.CaptureFixture[str] | None = None
    monkeypatch: pytest.MonkeyPatch | None = None
    given_servers: Servers | None = None
    used_servers: bool = False

    @property
    def servers(self) -> Servers:
        self.used_servers = True
        if self.given_servers is None:
            assert self.request is not None
            self.given_servers = self.request.getfixturevalue("servers")
        return self.given_servers

    @property
    def tmp(self) -> Path:
        assert self.tmp_path is not None
        return self.tmp_path

    @property
    def model_dir(self) -> Path:
        assert self.request is not None
        return Path(self.request.getfixturevalue("tiny_model_dir"))

    @property
    def model_id(self) -> str:
        """The generator's model id: the resolved model folder."""
        return str(self.model_dir.resolve())

    def places(self) -> Mapping[str, str]:
        """Values for the {placeholders} of CLI arguments, each made on first use."""
        bench = self

        class Places(dict[str, str]):
            def __missing__(self, key: str) -> str:
                value = {
                    "tmp": lambda: str(bench.tmp),
                    "model": lambda: str(bench.model_dir),
                    "gen": lambda: bench.servers.generator.address,
                    "enc": lambda: bench.servers.encoder.address,
                    "token": lambda: str(bench.request.getfixturevalue("token_file")),  # type: ignore[union-attr]
                    "emb": lambda: str(write(bench.tmp / "good.safetensors", embeddings_file()(bench))),
                    "dead": lambda: f"127.0.0.1:{free_port()}",
                    "certs": lambda: str(dev_certificates(bench.tmp / "certs")),
                }[key]()
                self[key] = value
                return value

        return Places()

    def run_cli(self, argv: list[str], env: Mapping[str, str]) -> Outcome:
        """`zsplit ARGV` in-process; its error line parsed. A model load counts as a failure to validate."""
        assert self.capsys is not None and self.monkeypatch is not None
        for name, value in env.items():
            self.monkeypatch.setenv(name, value)
        self.capsys.readouterr()
        try:
            exit_code = cli.main(argv)
        except SystemExit as exit:  # argparse's own usage errors
            exit_code = int(exit.code or 0)
        except ModelLoadStarted:
            return Outcome("MODEL LOADED", f"zsplit {' '.join(argv)} began loading a model before refusing")
        stderr = self.capsys.readouterr().err
        assert exit_code != 0, f"zsplit {' '.join(argv)} succeeded; stderr:\n{stderr}"
        assert "Traceback" not in stderr, stderr
        if match := re.search(r"zsplit: error \((\w+)\): (.*)", stderr, re.DOTALL):
            return Outcome(match[1], match[2].strip())
        if match := re.search(r"error: (.*)", stderr):
            return Outcome("usage", match[1].strip())
        raise AssertionError(f"zsplit {' '.join(argv)} exited {exit_code} with no error line:\n{stderr}")


Action = Callable[[Bench], Outcome]


@dataclass(frozen=True)
class Case:
    name: str
    target: str
    action: Action
    code: str
    # A substring of the message that says the fix; None where gRPC's standard health service sends none.
    fix: str | None

    @property
    def rpc(self) -> bool:
        """Sent with the raw stubs; the resource tests send these again and again."""
        return self.target in RPC_TARGETS


class ModelLoadStarted(Exception):
    """Raised in place of loading a model while CLI cases run."""


def status_of(call: Callable[[], object]) -> Outcome:
    try:
        call()
    except grpc.RpcError as error:
        return Outcome(error.code().name, error.details() or "")  # type: ignore[attr-defined]
    return Outcome("OK", "the call succeeded")


# -- Generate

HELD = "<the embedding the generator holds>"
Prompt: TypeAlias = "str | generator_pb2.Conditioning | None"


def _conditioning(value: Prompt, servers: Servers) -> generator_pb2.Conditioning | None:
    if value is None or isinstance(value, generator_pb2.Conditioning):
        return value
    if value == HELD:
        return generator_pb2.Conditioning(embedding_key=servers.held_key)
    return generator_pb2.Conditioning(text=value)


def generate(
    prompt: Prompt = "a cat",
    negative: Prompt = None,
    metadata: tuple[tuple[str, str], ...] | None = None,
    **fields: Any,
) -> Action:
    """A Generate that would be cheap if it passed: 64x64, one step, unless the case says otherwise."""

    def action(bench: Bench) -> Outcome:
        servers = bench.servers
        values = {"width": 64, "height": 64, "steps": 1, "seed": 0, **fields}
        request = generator_pb2.GenerateRequest(**{k: v for k, v in values.items() if v is not None})
        for name, value in (("prompt", prompt), ("negative_prompt", negative)):
            if (conditioning := _conditioning(value, servers)) is not None:
                getattr(request, name).CopyFrom(conditioning)
        auth = servers.auth if metadata is None else metadata
        return status_of(lambda: list(servers.gen.Generate(request, timeout=RPC_TIMEOUT, metadata=auth)))

    return action


def controlnet_generate(name: str = CONTROLNET, **fields: Any) -> Action:
    """A Generate with a ControlNet whose control image (64x64 PNG) is uploaded first; `fields` of the
    ControlNetRequest (image_key=None leaves the key empty) and, prefixed request_, of the request."""

    def action(bench: Bench) -> Outcome:
        servers = bench.servers
        data = png_file()
        key = servers.gen.UploadImage(
            iter(
                [
                    generator_pb2.UploadImageRequest(header=image_header(data)),
                    generator_pb2.UploadImageRequest(chunk=data),
                ]
            ),
            timeout=RPC_TIMEOUT,
            metadata=servers.auth,
        ).image_key
        controlnet = {"name": name, "image_key": key} | {
            k: v for k, v in fields.items() if not k.startswith("request_")
        }
        request = {k.removeprefix("request_"): v for k, v in fields.items() if k.startswith("request_")}
        controlnet = {k: v for k, v in controlnet.items() if v is not None}
        return generate(prompt=HELD, controlnet=generator_pb2.ControlNetRequest(**controlnet), **request)(
            bench
        )

    return action


# -- UploadEmbedding


def valid_tensor(tokens: int = 5, hidden: int = 16) -> torch.Tensor:
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens * hidden))


def upload_messages(
    tensor: torch.Tensor, chunks: Callable[[bytes], list[bytes]] | None = None, **header: Any
) -> list[generator_pb2.UploadEmbeddingRequest]:
    """A header for `tensor` (fields overridden by `header`), then its bytes, as `chunks` cuts them."""
    meta, payload = wire.describe(tensor)
    proto = wire.meta_to_proto(meta)
    for name, value in header.items():
        if name == "shape":
            del proto.shape[:]
            proto.shape.extend(value)
        else:
            setattr(proto, name, value)
    data = bytes(payload)
    pieces = chunks(data) if chunks is not None else [data]
    return [
        generator_pb2.UploadEmbeddingRequest(header=generator_pb2.UploadHeader(tensor=proto)),
        *(generator_pb2.UploadEmbeddingRequest(chunk=piece) for piece in pieces),
    ]


def bare_header(**fields: Any) -> generator_pb2.UploadEmbeddingRequest:
    return generator_pb2.UploadEmbeddingRequest(
        header=generator_pb2.UploadHeader(tensor=tensor_pb2.TensorHeader(**fields))
    )


def upload(
    messages: list[generator_pb2.UploadEmbeddingRequest], metadata: tuple[tuple[str, str], ...] | None = None
) -> Action:
    def action(bench: Bench) -> Outcome:
        servers = bench.servers
        auth = servers.auth if metadata is None else metadata
        return status_of(
            lambda: servers.gen.UploadEmbedding(iter(messages), timeout=RPC_TIMEOUT, metadata=auth)
        )

    return action


def with_value(value: float) -> torch.Tensor:
    tensor = valid_tensor()
    tensor[2, 3] = value
    return tensor


# -- Encode, Info, Health


def upload_image(*items: generator_pb2.UploadImageHeader | bytes) -> Action:
    """An UploadImage stream of these headers and chunks, in order."""
    messages = [
        generator_pb2.UploadImageRequest(header=item)
        if isinstance(item, generator_pb2.UploadImageHeader)
        else generator_pb2.UploadImageRequest(chunk=item)
        for item in items
    ]

    def action(bench: Bench) -> Outcome:
        servers = bench.servers
        return status_of(
            lambda: servers.gen.UploadImage(iter(messages), timeout=RPC_TIMEOUT, metadata=servers.auth)
        )

    return action


def list_loras(metadata: tuple[tuple[str, str], ...]) -> Action:
    def action(bench: Bench) -> Outcome:
        servers = bench.servers
        request = generator_pb2.ListLorasRequest()
        return status_of(lambda: servers.gen.ListLoras(request, timeout=RPC_TIMEOUT, metadata=metadata))

    return action


def image_header(data: bytes, **fields: Any) -> generator_pb2.UploadImageHeader:
    return generator_pb2.UploadImageHeader(**{"byte_length": len(data), **fields})


def png_file() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode(prompts: list[str], metadata: tuple[tuple[str, str], ...] | None = None, **options: Any) -> Action:
    request = encoder_pb2.EncodeRequest(prompts=prompts, options=encoder_pb2.EncodeOptions(**options))

    def action(bench: Bench) -> Outcome:
        servers = bench.servers
        auth = servers.auth if metadata is None else metadata
        return status_of(lambda: list(servers.enc.Encode(request, timeout=RPC_TIMEOUT, metadata=auth)))

    return action


def info(service: str, metadata: tuple[tuple[str, str], ...]) -> Action:
    def action(bench: Bench) -> Outcome:
        servers = bench.servers
        stub = servers.gen if service == "generator" else servers.enc
        module = generator_pb2 if service == "generator" else encoder_pb2
        return status_of(lambda: stub.Info(module.InfoRequest(), timeout=RPC_TIMEOUT, metadata=metadata))

    return action


def oversized_info(service: str) -> Action:
    """An InfoRequest padded with an unknown field past 2 MiB: protobuf would skip it, gRPC refuses it first."""
    path = f"/{GENERATOR_SERVICE if service == 'generator' else ENCODER_SERVICE}/Info"
    body = bytes([15 << 3 | 2]) + _varint(OVERSIZED) + b"\0" * OVERSIZED

    def action(bench: Bench) -> Outcome:
        servers = bench.servers
        call = servers.channels[service].unary_unary(path)  # no serializer: the body goes out as given
        return status_of(lambda: call(body, timeout=RPC_TIMEOUT, metadata=servers.auth))

    return action


GARBAGE = b"\xff\xff\xff\xff"  # field 0 is no field: no protobuf message parses from this


def undecodable(service: str, method: str, *, streaming_request: bool = False) -> Action:
    """A request body that is not a protobuf message of the method's type."""
    names = {"generator": GENERATOR_SERVICE, "encoder": ENCODER_SERVICE, "health": "grpc.health.v1.Health"}
    path = f"/{names[service]}/{method}"

    def action(bench: Bench) -> Outcome:
        servers = bench.servers
        channel = servers.channels["encoder" if service == "encoder" else "generator"]
        if streaming_request:
            upload_call = channel.stream_unary(path)
            return status_of(lambda: upload_call(iter([GARBAGE]), timeout=RPC_TIMEOUT, metadata=servers.auth))
        if method in ("Generate", "Encode"):
            stream_call = channel.unary_stream(path)
            return status_of(lambda: list(stream_call(GARBAGE, timeout=RPC_TIMEOUT, metadata=servers.auth)))
        call = channel.unary_unary(path)
        return status_of(lambda: call(GARBAGE, timeout=RPC_TIMEOUT, metadata=servers.auth))

    return action


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def health(service_of: str, name: str) -> Action:
    def action(bench: Bench) -> Outcome:
        stub = health_pb2_grpc.HealthStub(bench.servers.channels[service_of])
        return status_of(lambda: stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT))

    return action


# -- CLI and files

FileContent = str | bytes | Callable[[Bench], bytes]


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


def zsplit(
    *argv: str, files: Mapping[str, FileContent] | None = None, env: Mapping[str, str] | None = None
) -> Action:
    """`zsplit ARGV` with {placeholders} filled in (see Bench.places), after writing `files` under {tmp}."""

    def action(bench: Bench) -> Outcome:
        for name, content in (files or {}).items():
            write(bench.tmp / name, content(bench) if callable(content) else content)
        places = bench.places()
        return bench.run_cli([argument.format_map(places) for argument in argv], env or {})

    return action


def embeddings_file(
    tensor: torch.Tensor | None = None, model_id: str | None = None, **metadata: str
) -> Callable[[Bench], bytes]:
    """The bytes of an embeddings file as `zsplit encode` writes it, with header `metadata` overridden."""

    def make(bench: Bench) -> bytes:
        values = valid_tensor() if tensor is None else tensor
        item = PromptEmbedding(
            text="a lighthouse",
            content_key="0" * 64,
            tensor=values,
            token_count=values.shape[0],
            truncated=False,
        )
        path = bench.tmp / "made.safetensors"
        Embeddings([item], model_id=bench.model_id if model_id is None else model_id).save(path)
        if not metadata:
            return path.read_bytes()
        with safe_open(str(path), framework="pt") as handle:
            header = {**(handle.metadata() or {}), **metadata}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        return save(tensors, metadata=header)

    return make


def damaged(change: Callable[[bytes], bytes]) -> Callable[[Bench], bytes]:
    return lambda bench: change(embeddings_file()(bench))


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]


def dev_certificates(folder: Path) -> Path:
    from zimage_split.certs import write_dev_certificates

    if not (folder / "ca.crt").exists():
        write_dev_certificates(folder, ["localhost"])
    return folder


BATCH = ("generate", "--embeddings", "{tmp}/in.safetensors", "--out-dir", "{tmp}/out", "--no-progress")
TO_GENERATOR = ("--generator", "{gen}", "--auth-token-file", "{token}", "--sizes", "64x64", "--steps", "1")
ENCODE = (
    "encode",
    "-o",
    "{tmp}/out.safetensors",
    "--encoder",
    "{enc}",
    "--auth-token-file",
    "{token}",
    "--no-progress",
)
SERVE_ENCODER = ("serve", "encoder", "--model", "{model}", "--insecure")
SERVE_GENERATOR = ("serve", "generator", "--model", "{model}", "--insecure", "--encoder", "none")
NOT_PEM = "this is not a certificate\n"
PEM_LOOKING = "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n"
TOML = "zsplit.toml"
CONFIG = ("serve", "encoder", "--model", "{model}", "--insecure", "--config", "{tmp}/" + TOML)


# ---- The table -----------------------------------------------------------------------------------------

# One case per line, so that the table reads as a table.
# fmt: off
TABLE: list[Case] = [
    # -- GeneratorService.Generate: every check of validation.py and the servicer, and the transport.
    Case("generate-width-not-a-multiple-of-16", "Generate", generate(width=1000), "INVALID_ARGUMENT", "Use 992 or 1008"),
    Case("generate-height-not-a-multiple-of-16", "Generate", generate(height=40), "INVALID_ARGUMENT", "Use 32 or 48"),
    Case("generate-side-below-64", "Generate", generate(width=32), "INVALID_ARGUMENT", "between 64 and 4096 pixels (got 32)"),
    Case("generate-side-above-4096", "Generate", generate(height=8192), "INVALID_ARGUMENT", "between 64 and 4096 pixels (got 8192)"),
    Case("generate-over-max-pixels", "Generate", generate(width=1024, height=1024), "INVALID_ARGUMENT", "limit of 262144 (about 512² ); ask for a smaller image or raise --max-pixels"),
    Case("generate-default-size-over-max-pixels", "Generate", generate(width=None, height=None), "INVALID_ARGUMENT", "1024x1024 is 1048576 pixels, over this server's limit"),
    Case("generate-zero-steps", "Generate", generate(steps=0), "INVALID_ARGUMENT", "steps must be between 1 and 20 (got 0)"),
    Case("generate-steps-over-max-steps", "Generate", generate(steps=21), "INVALID_ARGUMENT", "steps must be between 1 and 20 (got 21)"),
    Case("generate-guidance-nan", "Generate", generate(guidance_scale=math.nan), "INVALID_ARGUMENT", "guidance_scale must be between 0 and 30"),
    Case("generate-guidance-negative", "Generate", generate(guidance_scale=-1.0), "INVALID_ARGUMENT", "guidance_scale must be between 0 and 30.0 (got -1.0)"),
    Case("generate-guidance-over-30", "Generate", generate(guidance_scale=31.0), "INVALID_ARGUMENT", "Turbo uses 0 (no guidance)"),
    Case("generate-cfg-normalization-negative", "Generate", generate(cfg_normalization=-1.0), "INVALID_ARGUMENT", "cfg_normalization must be >= 0 (got -1.0); 0 turns it off"),
    Case("generate-cfg-normalization-infinite", "Generate", generate(cfg_normalization=math.inf), "INVALID_ARGUMENT", "cfg_normalization must be >= 0 (got inf)"),
    Case("generate-cfg-truncation-over-1", "Generate", generate(cfg_truncation=1.5), "INVALID_ARGUMENT", "cfg_truncation must be between 0 and 1 (got 1.5); 1 never truncates"),
    Case("generate-cfg-truncation-nan", "Generate", generate(cfg_truncation=math.nan), "INVALID_ARGUMENT", "cfg_truncation must be between 0 and 1 (got nan)"),
    Case("generate-shift-0", "Generate", generate(shift=0.0), "INVALID_ARGUMENT", "shift must be between 0.1 and 20 (got 0.0); leave it unset for the model's own"),
    Case("generate-shift-negative", "Generate", generate(shift=-3.0), "INVALID_ARGUMENT", "shift must be between 0.1 and 20 (got -3.0)"),
    Case("generate-shift-over-20", "Generate", generate(shift=25.0), "INVALID_ARGUMENT", "shift must be between 0.1 and 20 (got 25.0)"),
    Case("generate-shift-nan", "Generate", generate(shift=math.nan), "INVALID_ARGUMENT", "shift must be between 0.1 and 20 (got nan)"),
    Case("generate-slg-negative-scale", "Generate", generate(skip_layer_guidance=generator_pb2.SkipLayerGuidance(scale=-1.0, layers=[1])), "INVALID_ARGUMENT", "slg_scale must be between 0 and 20 (got -1.0); 0 turns Skip Layer Guidance off"),
    Case("generate-slg-scale-nan", "Generate", generate(skip_layer_guidance=generator_pb2.SkipLayerGuidance(scale=math.nan, layers=[1])), "INVALID_ARGUMENT", "slg_scale must be between 0 and 20 (got nan)"),
    Case("generate-slg-layer-out-of-range", "Generate", generate(skip_layer_guidance=generator_pb2.SkipLayerGuidance(scale=2.0, layers=[0, 5])), "INVALID_ARGUMENT", "slg_layers names 5, but this DiT has blocks 0 to 1; name blocks in that range"),
    Case("generate-slg-negative-layer", "Generate", generate(skip_layer_guidance=generator_pb2.SkipLayerGuidance(scale=2.0, layers=[-1])), "INVALID_ARGUMENT", "slg_layers names -1, but this DiT has blocks 0 to 1"),
    Case("generate-slg-layer-twice", "Generate", generate(skip_layer_guidance=generator_pb2.SkipLayerGuidance(scale=2.0, layers=[1, 1])), "INVALID_ARGUMENT", "slg_layers [1, 1] names a block twice"),
    Case("generate-slg-default-layers-beyond-the-dit", "Generate", generate(skip_layer_guidance=generator_pb2.SkipLayerGuidance(scale=2.0)), "INVALID_ARGUMENT", "The default slg_layers (7-12, for Z-Image's 30 blocks) are not all in this DiT"),
    Case("generate-slg-start-after-stop", "Generate", generate(skip_layer_guidance=generator_pb2.SkipLayerGuidance(scale=2.0, layers=[1], start=0.6, stop=0.2)), "INVALID_ARGUMENT", "slg_start (0.6) must be below slg_stop (0.2)"),
    Case("generate-slg-stop-over-1", "Generate", generate(skip_layer_guidance=generator_pb2.SkipLayerGuidance(scale=2.0, layers=[1], stop=1.5)), "INVALID_ARGUMENT", "slg_stop must be between 0 and 1, a fraction of the steps (got 1.5)"),
    Case("generate-slg-layers-without-scale", "Generate", generate(skip_layer_guidance=generator_pb2.SkipLayerGuidance(layers=[1])), "INVALID_ARGUMENT", "slg_layers, slg_start and slg_stop need slg_scale > 0"),
    Case("generate-dype-unknown-method", "Generate", generate(dype=generator_pb2.Dype(method="yarn2")), "INVALID_ARGUMENT", "Unknown dype method 'yarn2'; use one of vision_yarn, ntk, pi"),
    Case("generate-dype-negative-scale", "Generate", generate(dype=generator_pb2.Dype(scale=-1.0)), "INVALID_ARGUMENT", "dype_scale must be between 0 and 10 (got -1.0); the default is 2"),
    Case("generate-dype-exponent-inf", "Generate", generate(dype=generator_pb2.Dype(exponent=math.inf)), "INVALID_ARGUMENT", "dype_exponent must be between 0 and 10 (got inf)"),
    Case("generate-dype-over-max-pixels", "Generate", generate(width=4096, height=4096, dype=generator_pb2.Dype()), "INVALID_ARGUMENT", "4096x4096 is 16777216 pixels, over this server's limit"),
    Case("generate-one-pass", "Generate", generate(passes=[generator_pb2.Pass(scale=1.0)]), "INVALID_ARGUMENT", "passes takes 2 to 4 passes (got 1); one pass is a plain request"),
    Case("generate-five-passes", "Generate", generate(width=512, height=512, passes=[generator_pb2.Pass(scale=s) for s in (0.2, 0.4, 0.6, 0.8, 1.0)]), "INVALID_ARGUMENT", "passes takes 2 to 4 passes (got 5)"),
    Case("generate-pass-scales-falling", "Generate", generate(width=256, height=256, passes=[generator_pb2.Pass(scale=0.5), generator_pb2.Pass(scale=0.25), generator_pb2.Pass(scale=1.0)]), "INVALID_ARGUMENT", "passes[1].scale must be above 0.5 and at most 1 (got 0.25)"),
    Case("generate-last-pass-not-full-size", "Generate", generate(width=256, height=256, passes=[generator_pb2.Pass(scale=0.5), generator_pb2.Pass(scale=0.75)]), "INVALID_ARGUMENT", "The last pass makes the request's size: give it scale 1 (got 0.75)"),
    Case("generate-pass-scale-nan", "Generate", generate(width=256, height=256, passes=[generator_pb2.Pass(scale=math.nan), generator_pb2.Pass(scale=1.0)]), "INVALID_ARGUMENT", "passes[0].scale must be above 0 and at most 1 (got nan)"),
    Case("generate-pass-too-small", "Generate", generate(width=256, height=256, passes=[generator_pb2.Pass(scale=0.2), generator_pb2.Pass(scale=1.0)]), "INVALID_ARGUMENT", "passes[0] at scale 0.2 makes 48x48, under the 64-pixel smallest side"),
    Case("generate-first-pass-with-strength", "Generate", generate(width=256, height=256, passes=[generator_pb2.Pass(scale=0.5, strength=0.5), generator_pb2.Pass(scale=1.0)]), "INVALID_ARGUMENT", "passes[0].strength has nothing to act on"),
    Case("generate-pass-strength-over-1", "Generate", generate(width=256, height=256, passes=[generator_pb2.Pass(scale=0.5), generator_pb2.Pass(scale=1.0, strength=2.0)]), "INVALID_ARGUMENT", "passes[1].strength must be above 0 and at most 1 (got 2)"),
    Case("generate-pass-steps-over-limit", "Generate", generate(width=256, height=256, passes=[generator_pb2.Pass(scale=0.5, steps=1000), generator_pb2.Pass(scale=1.0)]), "INVALID_ARGUMENT", "passes[0].steps must be between 1 and 20 (got 1000)"),
    Case("generate-intermediate-without-passes", "Generate", generate(return_intermediate=True), "INVALID_ARGUMENT", "return_intermediate needs passes"),
    Case("generate-max-sequence-length-0", "Generate", generate(max_sequence_length=0), "INVALID_ARGUMENT", "max_sequence_length must be between 1 and 1504, this DiT's caption limit (got 0); default 512"),
    Case("generate-max-sequence-length-1505", "Generate", generate(max_sequence_length=1505), "INVALID_ARGUMENT", "max_sequence_length must be between 1 and 1504, this DiT's caption limit (got 1505)"),
    Case("generate-unknown-model", "Generate", generate(model="someone/other-model"), "NOT_FOUND", "or leave `model` empty"),
    Case("generate-no-prompt", "Generate", generate(prompt=None), "INVALID_ARGUMENT", "GenerateRequest.prompt is empty; set its `text` or an `embedding_key`"),
    Case("generate-empty-conditioning", "Generate", generate(prompt=generator_pb2.Conditioning()), "INVALID_ARGUMENT", "set its `text` or an `embedding_key` from UploadEmbedding"),
    Case("generate-prompt-over-max-prompt-bytes", "Generate", generate(prompt="x" * 2001), "INVALID_ARGUMENT", "is 2001 bytes of UTF-8; this generator takes at most 2000 (--max-prompt-bytes). Shorten it"),
    Case("generate-prompt-bytes-not-characters", "Generate", generate(prompt="€" * 667), "INVALID_ARGUMENT", "prompt.text is 2001 bytes of UTF-8"),
    Case("generate-negative-prompt-over-max-prompt-bytes", "Generate", generate(negative="x" * 2001, guidance_scale=2.0), "INVALID_ARGUMENT", "GenerateRequest.negative_prompt.text is 2001 bytes"),
    Case("generate-empty-negative-conditioning", "Generate", generate(negative=generator_pb2.Conditioning(), guidance_scale=2.0), "INVALID_ARGUMENT", "GenerateRequest.negative_prompt is empty"),
    Case("generate-prompt-over-the-encoders-limit", "Generate", generate(prompt="y" * 1500), "INVALID_ARGUMENT", "Prompt 0 is 1500 bytes of UTF-8; this encoder takes at most 1000 (--max-prompt-bytes)"),
    Case("generate-embedding-key-not-held", "Generate", generate(prompt=generator_pb2.Conditioning(embedding_key="0" * 64)), "NOT_FOUND", "is not held by this generator (never uploaded, or evicted). Upload the embedding again"),
    Case("generate-negative-embedding-key-not-held", "Generate", generate(prompt=HELD, negative=generator_pb2.Conditioning(embedding_key="f" * 64), guidance_scale=2.0), "NOT_FOUND", "Upload the embedding again with UploadEmbedding"),
    Case("generate-zero-images", "Generate", generate(num_images=0), "INVALID_ARGUMENT", "num_images must be between 1 and 4 (got 0)"),
    Case("generate-more-images-than-allowed", "Generate", generate(num_images=5), "INVALID_ARGUMENT", "send several requests for more (this generator's --max-images-per-request)"),
    Case("generate-images-past-the-last-seed", "Generate", generate(seed=2**64 - 1, num_images=2), "INVALID_ARGUMENT", "runs past the largest seed, 2**64 - 1; pick a smaller seed"),
    Case("generate-request-id-reused-for-another-request", "Generate", generate(prompt=HELD, request_id=REUSED_ID, seed=2), "INVALID_ARGUMENT", "was already used for a different request; give every distinct request its own request_id"),
    Case("generate-message-over-max-message-mb", "Generate", generate(prompt="z" * OVERSIZED), "RESOURCE_EXHAUSTED", "Received message larger than max"),
    Case("generate-body-not-a-message", "Generate", undecodable("generator", "Generate"), "INVALID_ARGUMENT", "is not a valid protobuf message of its type"),
    Case("generate-without-token", "Generate", generate(metadata=NO_TOKEN), "UNAUTHENTICATED", "send 'authorization: Bearer <token>'"),
    Case("generate-wrong-token", "Generate", generate(metadata=WRONG_TOKEN), "UNAUTHENTICATED", "--auth-token-file or ZSPLIT_AUTH_TOKEN"),
    # -- GeneratorService.UploadEmbedding: wire.py's header and stream checks, then validate_embedding.
    Case("generate-lora-without-lora-dir", "Generate", generate(loras=[generator_pb2.LoraRequest(name="style")]), "INVALID_ARGUMENT", "--lora-dir"),
    Case("generate-lora-scale-nan", "Generate", generate(loras=[generator_pb2.LoraRequest(name="style", scale=math.nan)]), "INVALID_ARGUMENT", "scale"),
    Case("generate-output-format-unknown", "Generate", generate(output_format=99), "INVALID_ARGUMENT", "Unknown output_format 99; use PNG, JPEG, WEBP or LATENT"),
    Case("generate-quality-with-png", "Generate", generate(quality=90), "INVALID_ARGUMENT", "quality applies only to jpeg and webp output"),
    Case("generate-quality-0", "Generate", generate(output_format=generator_pb2.OUTPUT_FORMAT_JPEG, quality=0), "INVALID_ARGUMENT", "quality must be between 1 and 100 (got 0)"),
    Case("generate-long-prompt-mode-unknown", "Generate", generate(long_prompt_mode=9), "INVALID_ARGUMENT", "Unknown long_prompt_mode 9; use TRUNCATE, INTERPOLATE or POOL"),
    Case("generate-controlnet-unknown", "Generate", controlnet_generate("pose"), "NOT_FOUND", "No ControlNet 'pose' on this generator. Loaded: 'cn'."),
    Case("generate-controlnet-control-image-wrong-size", "Generate", controlnet_generate(request_width=128), "INVALID_ARGUMENT", "The control image is 64x64, another shape than the 128x64 requested; crop it to that aspect ratio"),
    Case("generate-controlnet-negative-scale", "Generate", controlnet_generate(conditioning_scale=-1.0), "INVALID_ARGUMENT", "controlnet.conditioning_scale must be between 0 and 10 (got -1.0)"),
    Case("generate-controlnet-scale-nan", "Generate", controlnet_generate(conditioning_scale=math.nan), "INVALID_ARGUMENT", "controlnet.conditioning_scale must be between 0 and 10 (got nan)"),
    Case("generate-controlnet-no-image-key", "Generate", controlnet_generate(image_key=None), "INVALID_ARGUMENT", "controlnet.image_key is empty; upload the control image with UploadImage"),
    Case("generate-controlnet-image-key-unknown", "Generate", controlnet_generate(image_key="img-" + "0" * 64), "NOT_FOUND", "no longer holds the upload"),
    Case("generate-controlnet-with-slg", "Generate", controlnet_generate(request_skip_layer_guidance=generator_pb2.SkipLayerGuidance(scale=2.0, layers=[1])), "INVALID_ARGUMENT", "Skip Layer Guidance does not combine with a ControlNet yet"),
    Case("generate-init-image-no-key", "Generate", generate(init_image=generator_pb2.InitImage()), "INVALID_ARGUMENT", "init_image.image_key is empty; upload the start image with UploadImage"),
    Case("generate-init-image-unknown-key", "Generate", generate(init_image=generator_pb2.InitImage(image_key="img-" + "0" * 64)), "NOT_FOUND", "UploadImage"),
    Case("upload-image-not-an-image", "UploadImage", upload_image(image_header(b"hello"), b"hello"), "INVALID_ARGUMENT", "PNG, JPEG or WebP"),
    Case("upload-image-cut-short", "UploadImage", upload_image(image_header(png_file()), png_file()[:50]), "INVALID_ARGUMENT", "UploadImage received 50 of the"),
    Case("upload-image-too-long", "UploadImage", upload_image(image_header(b"x"), png_file()), "INVALID_ARGUMENT", "more than the 1 bytes its header announced"),
    Case("upload-image-zero-length", "UploadImage", upload_image(image_header(b"")), "INVALID_ARGUMENT", "An uploaded image must be 1 to"),
    Case("upload-image-no-header", "UploadImage", upload_image(png_file()), "INVALID_ARGUMENT", "UploadImage must start with a header message"),
    Case("upload-image-bad-sha256", "UploadImage", upload_image(image_header(png_file(), sha256="0" * 64), png_file()), "DATA_LOSS", "sha256"),
    Case("upload-image-without-token", "UploadImage", lambda bench: status_of(lambda: bench.servers.gen.UploadImage(iter([]), timeout=RPC_TIMEOUT, metadata=NO_TOKEN)), "UNAUTHENTICATED", "needs a valid bearer token"),
    Case("upload-image-body-not-a-message", "UploadImage", undecodable("generator", "UploadImage", streaming_request=True), "INVALID_ARGUMENT", "is not a valid protobuf message"),
    Case("list-loras-without-token", "ListLoras", list_loras(NO_TOKEN), "UNAUTHENTICATED", "GeneratorService/ListLoras needs a valid bearer token"),
    Case("list-loras-wrong-token", "ListLoras", list_loras(WRONG_TOKEN), "UNAUTHENTICATED", "ClientSecurity(token=...)"),
    Case("list-loras-body-not-a-message", "ListLoras", undecodable("generator", "ListLoras"), "INVALID_ARGUMENT", "GeneratorService/ListLoras is not a valid protobuf message"),
    Case("upload-chunk-before-header", "UploadEmbedding", upload([generator_pb2.UploadEmbeddingRequest(chunk=b"\0" * 64)]), "INVALID_ARGUMENT", "must start with a header message, then the chunks"),
    Case("upload-empty-stream", "UploadEmbedding", upload([]), "INVALID_ARGUMENT", "received no header; send a header, then the chunks"),
    Case("upload-two-headers", "UploadEmbedding", upload([*upload_messages(valid_tensor())[:1]] * 2), "INVALID_ARGUMENT", "takes one header; upload one embedding per call"),
    Case("upload-dtype-unspecified", "UploadEmbedding", upload(upload_messages(valid_tensor(), dtype=tensor_pb2.DTYPE_UNSPECIFIED)), "INVALID_ARGUMENT", "dtype code 0; send bfloat16, float16 or float32"),
    Case("upload-dtype-unknown", "UploadEmbedding", upload(upload_messages(valid_tensor(), dtype=99)), "INVALID_ARGUMENT", "dtype code 99; send bfloat16, float16 or float32"),
    Case("upload-float32-bytes-announced-as-float16", "UploadEmbedding", upload(upload_messages(valid_tensor(), dtype=tensor_pb2.DTYPE_FLOAT16)), "INVALID_ARGUMENT", "Header says 320 bytes but shape [5, 16] in float16 needs 160"),
    Case("upload-byte-length-zero", "UploadEmbedding", upload(upload_messages(valid_tensor(), byte_length=0)), "INVALID_ARGUMENT", "the sender's header is inconsistent"),
    Case("upload-shape-empty", "UploadEmbedding", upload(upload_messages(valid_tensor(), shape=[])), "INVALID_ARGUMENT", "Tensor shape [] is invalid; send non-negative dimensions"),
    Case("upload-shape-negative", "UploadEmbedding", upload(upload_messages(valid_tensor(), shape=[-5, -16])), "INVALID_ARGUMENT", "Tensor shape [-5, -16] is invalid"),
    Case("upload-over-256-mib", "UploadEmbedding", upload([bare_header(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1 << 20, 1 << 20], byte_length=1 << 42)]), "INVALID_ARGUMENT", "268435456-byte limit"),
    Case("upload-blake3-not-hex-64", "UploadEmbedding", upload(upload_messages(valid_tensor(), blake3="abc")), "INVALID_ARGUMENT", "Tensor header's blake3 must be 64 hex characters (got 3 characters)"),
    Case("upload-sha256-not-hex-64", "UploadEmbedding", upload(upload_messages(valid_tensor(), blake3="", sha256="abc")), "INVALID_ARGUMENT", "Tensor header's sha256 must be 64 hex characters"),
    Case("upload-no-checksum", "UploadEmbedding", upload(upload_messages(valid_tensor(), blake3="")), "INVALID_ARGUMENT", "Tensor header carries no checksum; send the payload's hex BLAKE3 in TensorHeader.blake3"),
    Case("upload-more-bytes-than-announced", "UploadEmbedding", upload(upload_messages(valid_tensor(), chunks=lambda data: [data, b"\0" * 4])), "INVALID_ARGUMENT", "sent more data than its header said"),
    Case("upload-stream-cut-short", "UploadEmbedding", upload(upload_messages(valid_tensor(300), chunks=lambda data: [data[:4096]])), "INVALID_ARGUMENT", "the transfer was cut short. Send it again"),
    Case("upload-bytes-do-not-match-blake3", "UploadEmbedding", upload(upload_messages(valid_tensor(), chunks=lambda data: [flip(data, 7)])), "DATA_LOSS", "do not match their BLAKE3: the data was corrupted. Send it again"),
    Case("upload-bytes-do-not-match-an-older-clients-sha256", "UploadEmbedding", upload(upload_messages(valid_tensor(), blake3="", sha256=hashlib.sha256(wire.payload_view(valid_tensor())).hexdigest(), chunks=lambda data: [flip(data, 7)])), "DATA_LOSS", "do not match their sha256: the data was corrupted. Send it again"),
    Case("upload-hidden-size-of-another-encoder", "UploadEmbedding", upload(upload_messages(valid_tensor(hidden=32))), "INVALID_ARGUMENT", "hidden size 32, but this generator's DiT takes 16"),
    Case("upload-one-dimension", "UploadEmbedding", upload(upload_messages(torch.zeros(16))), "INVALID_ARGUMENT", "must have shape [tokens, 16] (got [16])"),
    Case("upload-three-dimensions", "UploadEmbedding", upload(upload_messages(torch.zeros(1, 4, 16))), "INVALID_ARGUMENT", "must have shape [tokens, 16] (got [1, 4, 16])"),
    Case("upload-zero-tokens", "UploadEmbedding", upload(upload_messages(torch.zeros(0, 16))), "INVALID_ARGUMENT", "has 0 tokens; send between 1 and 1504"),
    Case("upload-too-many-tokens", "UploadEmbedding", upload(upload_messages(valid_tensor(1505))), "INVALID_ARGUMENT", "has 1505 tokens; send between 1 and 1504"),
    Case("upload-nan", "UploadEmbedding", upload(upload_messages(with_value(math.nan))), "INVALID_ARGUMENT", "contains NaN or infinite values; re-encode the prompt"),
    Case("upload-infinity", "UploadEmbedding", upload(upload_messages(with_value(-math.inf))), "INVALID_ARGUMENT", "contains NaN or infinite values"),
    Case("upload-chunk-over-max-message-mb", "UploadEmbedding", upload(upload_messages(valid_tensor(), chunks=lambda data: [b"\0" * OVERSIZED])), "RESOURCE_EXHAUSTED", "Received message larger than max"),
    Case("upload-nine-dimensions", "UploadEmbedding", upload([bare_header(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1] * 9, byte_length=4)]), "INVALID_ARGUMENT", "has 9 dimensions; send at most 8"),
    Case("upload-no-bytes-but-a-huge-shape", "UploadEmbedding", upload([bare_header(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[0, 1 << 40, 1 << 40])]), "INVALID_ARGUMENT", "(counting zero dimensions as 1), over the 268435456-byte limit"),
    Case("upload-message-not-a-message", "UploadEmbedding", undecodable("generator", "UploadEmbedding", streaming_request=True), "INVALID_ARGUMENT", "Build it from the .proto files in proto/zimage/"),
    Case("upload-without-token", "UploadEmbedding", upload(upload_messages(valid_tensor()), metadata=NO_TOKEN), "UNAUTHENTICATED", "needs a valid bearer token"),
    # -- GeneratorService.Info takes no fields: only who asks and how much they send can be wrong.
    Case("generator-info-without-token", "GeneratorService.Info", info("generator", NO_TOKEN), "UNAUTHENTICATED", "GeneratorService/Info needs a valid bearer token"),
    Case("generator-info-wrong-token", "GeneratorService.Info", info("generator", WRONG_TOKEN), "UNAUTHENTICATED", "ClientSecurity(token=...)"),
    Case("generator-info-body-not-a-message", "GeneratorService.Info", undecodable("generator", "Info"), "INVALID_ARGUMENT", "GeneratorService/Info is not a valid protobuf message"),
    Case("generator-info-message-over-max-message-mb", "GeneratorService.Info", oversized_info("generator"), "RESOURCE_EXHAUSTED", "Received message larger than max"),
    # -- EncoderService.Encode
    Case("encode-no-prompts", "Encode", encode([]), "INVALID_ARGUMENT", "EncodeRequest.prompts is empty; send at least one prompt ('' is allowed)"),
    Case("encode-over-max-prompts-per-request", "Encode", encode(["a"] * 9), "INVALID_ARGUMENT", "9 prompts in one call; send at most 8 per call (split the list, or raise the encoder's --max-prompts-per-request)"),
    Case("encode-prompt-over-max-prompt-bytes", "Encode", encode(["x" * 1001]), "INVALID_ARGUMENT", "Prompt 0 is 1001 bytes of UTF-8; this encoder takes at most 1000 (--max-prompt-bytes)"),
    Case("encode-later-prompt-over-max-prompt-bytes", "Encode", encode(["fine", "x" * 1001]), "INVALID_ARGUMENT", "Prompt 1 is 1001 bytes"),
    Case("encode-prompt-bytes-not-characters", "Encode", encode(["€" * 334]), "INVALID_ARGUMENT", "Prompt 0 is 1002 bytes of UTF-8"),
    Case("encode-max-sequence-length-0", "Encode", encode(["a"], max_sequence_length=0), "INVALID_ARGUMENT", "max_sequence_length must be between 1 and 1504 (got 0)"),
    Case("encode-max-sequence-length-1505", "Encode", encode(["a"], max_sequence_length=1505), "INVALID_ARGUMENT", "max_sequence_length must be between 1 and 1504 (got 1505); default 512. 1504 tokens is the DiT's caption limit"),
    Case("encode-hidden-layer-deeper-than-kept", "Encode", encode(["a"], hidden_layer=-1), "INVALID_ARGUMENT", "keeps layers only up to hidden_layer -2; got -1. Restart it with --hidden-layer -1"),
    Case("encode-hidden-layer-below-the-first", "Encode", encode(["a"], hidden_layer=-3), "INVALID_ARGUMENT", "hidden_layer must be between -2 and -1 for this 2-layer encoder (got -3); Z-Image uses -2"),
    Case("encode-hidden-layer-not-negative", "Encode", encode(["a"], hidden_layer=0), "INVALID_ARGUMENT", "hidden_layer must be between -2 and -1 for this 2-layer encoder (got 0)"),
    Case("encode-message-over-max-message-mb", "Encode", encode(["x" * OVERSIZED]), "RESOURCE_EXHAUSTED", "Received message larger than max"),
    Case("encode-body-not-a-message", "Encode", undecodable("encoder", "Encode"), "INVALID_ARGUMENT", "EncoderService/Encode is not a valid protobuf message"),
    Case("encode-without-token", "Encode", encode(["a"], metadata=NO_TOKEN), "UNAUTHENTICATED", "EncoderService/Encode needs a valid bearer token"),
    Case("encode-wrong-token", "Encode", encode(["a"], metadata=WRONG_TOKEN), "UNAUTHENTICATED", "--auth-token-file or ZSPLIT_AUTH_TOKEN"),
    # -- EncoderService.Info: no fields either.
    Case("encoder-info-without-token", "EncoderService.Info", info("encoder", NO_TOKEN), "UNAUTHENTICATED", "EncoderService/Info needs a valid bearer token"),
    Case("encoder-info-wrong-token", "EncoderService.Info", info("encoder", WRONG_TOKEN), "UNAUTHENTICATED", "ClientSecurity(token=...)"),
    Case("encoder-info-body-not-a-message", "EncoderService.Info", undecodable("encoder", "Info"), "INVALID_ARGUMENT", "(or use the zimage_split SDK)"),
    Case("encoder-info-message-over-max-message-mb", "EncoderService.Info", oversized_info("encoder"), "RESOURCE_EXHAUSTED", "Received message larger than max"),
    # -- grpc.health.v1.Health/Check: grpc's standard servicer answers NOT_FOUND with no details (fix None).
    Case("health-unknown-service-on-generator", "Health/Check", health("generator", "no.such.Service"), "NOT_FOUND", None),
    Case("health-encoders-service-asked-of-generator", "Health/Check", health("generator", ENCODER_SERVICE), "NOT_FOUND", None),
    Case("health-body-not-a-message", "Health/Check", undecodable("health", "Check"), "INVALID_ARGUMENT", "Health/Check is not a valid protobuf message"),
    Case("health-unknown-service-on-encoder", "Health/Check", health("encoder", "zimage.encoder.v2.EncoderService"), "NOT_FOUND", None),
    # -- CLI flags: each must fail before any model loads (the loaders are trapped).
    Case("cli-serve-unknown-model-path", "CLI flags", zsplit("serve", "encoder", "--model", "{tmp}/no-such-model", "--insecure"), "NOT_FOUND", "No model folder at"),
    Case("cli-serve-folder-that-is-not-a-model", "CLI flags", zsplit("serve", "generator", "--model", "{tmp}", "--insecure", "--encoder", "none"), "NOT_FOUND", "is not a diffusers model folder (no model_index.json)"),
    Case("cli-generate-unknown-model-path", "CLI flags", zsplit("generate", "a cat", "--model", "{tmp}/no-such-model"), "NOT_FOUND", "or `--model tiny` for the offline random model"),
    Case("cli-serve-neither-tls-nor-insecure", "CLI flags", zsplit("serve", "encoder", "--model", "{model}"), "INVALID_ARGUMENT", "Pass --tls-cert and --tls-key (see `zsplit certs`), or --insecure"),
    Case("cli-serve-tls-and-insecure", "CLI flags", zsplit(*SERVE_ENCODER, "--tls-cert", "{certs}/encoder.crt", "--tls-key", "{certs}/encoder.key"), "INVALID_ARGUMENT", "--insecure (plaintext) contradicts --tls-cert, --tls-key (TLS)"),
    Case("cli-serve-cert-without-key", "CLI flags", zsplit("serve", "encoder", "--model", "{model}", "--tls-cert", "{certs}/encoder.crt"), "INVALID_ARGUMENT", "TLS needs both --tls-cert and --tls-key"),
    Case("cli-serve-max-message-mb-negative", "CLI flags", zsplit(*SERVE_ENCODER, "--max-message-mb", "-1"), "INVALID_ARGUMENT", "--max-message-mb must be between 2 and 2047 (got -1)"),
    Case("cli-serve-max-message-mb-over-grpc", "CLI flags", zsplit(*SERVE_GENERATOR, "--max-message-mb", "4096"), "INVALID_ARGUMENT", "--max-message-mb must be between 2 and 2047 (got 4096)"),
    Case("cli-serve-max-streams-per-connection-0", "CLI flags", zsplit(*SERVE_GENERATOR, "--max-streams-per-connection", "0"), "INVALID_ARGUMENT", "--max-streams-per-connection must be at least 1 (got 0)"),
    Case("cli-serve-negative-shutdown-grace", "CLI flags", zsplit(*SERVE_ENCODER, "--shutdown-grace", "-1"), "INVALID_ARGUMENT", "--shutdown-grace must be >= 0 seconds"),
    Case("cli-serve-max-prompt-bytes-0", "CLI flags", zsplit(*SERVE_ENCODER, "--max-prompt-bytes", "0"), "INVALID_ARGUMENT", "--max-prompt-bytes must be at least 1 (got 0)"),
    Case("cli-serve-max-prompts-per-request-0", "CLI flags", zsplit(*SERVE_ENCODER, "--max-prompts-per-request", "0"), "INVALID_ARGUMENT", "--max-prompts-per-request must be at least 1"),
    Case("cli-serve-encoder-max-sequence-length-0", "CLI flags", zsplit(*SERVE_ENCODER, "--max-sequence-length", "0"), "INVALID_ARGUMENT", "--max-sequence-length must be between 1 and 4096 (got 0)"),
    Case("cli-serve-encoder-max-batch-size-0", "CLI flags", zsplit(*SERVE_ENCODER, "--max-batch-size", "0"), "INVALID_ARGUMENT", "--max-batch-size must be at least 1 (got 0)"),
    Case("cli-serve-max-pixels-below-64x64", "CLI flags", zsplit(*SERVE_GENERATOR, "--max-pixels", "100"), "INVALID_ARGUMENT", "--max-pixels must be between 4096 and"),
    Case("cli-serve-max-steps-0", "CLI flags", zsplit(*SERVE_GENERATOR, "--max-steps", "0"), "INVALID_ARGUMENT", "--max-steps must be between 1 and"),
    Case("cli-serve-max-queue-0", "CLI flags", zsplit(*SERVE_GENERATOR, "--max-queue", "0"), "INVALID_ARGUMENT", "--max-queue must be at least 1 (got 0)"),
    Case("cli-serve-negative-encoder-retries", "CLI flags", zsplit(*SERVE_GENERATOR, "--encoder-retries", "-1"), "INVALID_ARGUMENT", "--encoder-retries must be at least 0 (got -1)"),
    Case("cli-serve-encoder-list-with-an-empty-entry", "CLI flags", zsplit("serve", "generator", "--model", "{model}", "--insecure", "--encoder", "127.0.0.1:50051,,127.0.0.1:50061"), "INVALID_ARGUMENT", "hold an empty entry; give HOST:PORT addresses separated by commas"),
    Case("cli-serve-encoder-list-with-a-duplicate", "CLI flags", zsplit("serve", "generator", "--model", "{model}", "--insecure", "--encoder", "127.0.0.1:50051, 127.0.0.1:50051"), "INVALID_ARGUMENT", "name 127.0.0.1:50051 twice"),
    Case("cli-generate-encoder-port-0", "CLI flags", zsplit("generate", "a cat", "--model", "{model}", "--encoder", "127.0.0.1:50051,127.0.0.1:0"), "INVALID_ARGUMENT", "The encoder address '127.0.0.1:0' is not HOST:PORT"),
    Case("cli-serve-port-out-of-range", "CLI flags", zsplit(*SERVE_ENCODER, "--port", "70000"), "INVALID_ARGUMENT", "--port must be between 0 and 65535 (got 70000)"),
    Case("cli-serve-replicas-without-ray", "CLI flags", zsplit(*SERVE_GENERATOR, "--replicas", "2"), "INVALID_ARGUMENT", "--replicas needs --ray-address (local, auto or HOST:PORT)"),
    Case("cli-serve-replicas-not-a-number", "CLI flags", zsplit(*SERVE_GENERATOR, "--ray-address", "local", "--replicas", "two"), "INVALID_ARGUMENT", "--replicas takes 'auto' or a positive number (got 'two')"),
    Case("cli-serve-remote-encoder-without-tls", "CLI flags", zsplit("serve", "generator", "--model", "{model}", "--insecure", "--encoder", "10.1.2.3:50051"), "INVALID_ARGUMENT", "10.1.2.3:50051 is not a loopback address (127.0.0.1, ::1 or localhost), so plaintext to it needs --encoder-insecure"),
    Case("cli-serve-dtype-not-a-choice", "CLI flags", zsplit(*SERVE_ENCODER, "--dtype", "int8"), "usage", "argument --dtype: invalid choice: 'int8'"),
    Case("cli-generate-remote-generator-without-tls", "CLI flags", zsplit("generate", "a cat", "--generator", "10.1.2.3:50052"), "INVALID_ARGUMENT", "10.1.2.3:50052 is not a loopback address"),
    Case("cli-generate-insecure-and-tls-ca", "CLI flags", zsplit("generate", "a cat", "--generator", "{dead}", "--insecure", "--tls-ca", "{certs}/ca.crt"), "INVALID_ARGUMENT", "--insecure (plaintext) contradicts --tls-ca (TLS)"),
    Case("cli-generate-neither-prompt-nor-embeddings", "CLI flags", zsplit("generate", "--generator", "{dead}"), "INVALID_ARGUMENT", 'Give a prompt (zsplit generate "a red fox"), or --embeddings FILE'),
    Case("cli-generate-prompt-and-embeddings", "CLI flags", zsplit("generate", "a cat", "--embeddings", "{emb}", "--generator", "{dead}"), "INVALID_ARGUMENT", "--embeddings makes a batch; drop a prompt"),
    Case("cli-generate-negative-seed", "CLI flags", zsplit("generate", "a cat", "--seed", "-1", "--generator", "{dead}"), "INVALID_ARGUMENT", "seed takes 0 to 2**64-1"),
    Case("cli-generate-negative-width", "CLI flags", zsplit("generate", "a cat", "--width", "-16", "--generator", "{dead}"), "INVALID_ARGUMENT", "width, height, steps and max_sequence_length take integers from 0 to 2**32-1"),
    Case("cli-generate-width-not-a-number", "CLI flags", zsplit("generate", "a cat", "--width", "wide"), "usage", "argument --width: invalid int value: 'wide'"),
    Case("cli-generate-bad-sizes", "CLI flags", zsplit("generate", "--embeddings", "{emb}", "--sizes", "1024by1024", "--generator", "{dead}", "--out-dir", "{tmp}/out"), "INVALID_ARGUMENT", "--sizes entry '1024by1024' is not WIDTHxHEIGHT"),
    Case("cli-generate-bad-seeds", "CLI flags", zsplit("generate", "--embeddings", "{emb}", "--seeds", "7-3", "--generator", "{dead}", "--out-dir", "{tmp}/out"), "INVALID_ARGUMENT", "--seeds '7-3' is not a seed list; use e.g. '0-7'"),
    Case("cli-generate-seed-over-64-bits", "CLI flags", zsplit("generate", "--embeddings", "{emb}", "--seeds", str(2**64), "--generator", "{dead}", "--out-dir", "{tmp}/out"), "INVALID_ARGUMENT", "(0 to 2**64-1)"),
    Case("cli-generate-a-trillion-seeds", "CLI flags", zsplit("generate", "--embeddings", "{emb}", "--seeds", "0-1000000000000", "--generator", "{dead}", "--out-dir", "{tmp}/out"), "INVALID_ARGUMENT", "asks for more than 100000 seeds per prompt; split the batch"),
    Case("cli-encode-negative-max-sequence-length", "CLI flags", zsplit("encode", "--prompts", "{tmp}/p.txt", "-o", "{tmp}/e.safetensors", "--encoder", "{dead}", "--max-sequence-length", "-1", files={"p.txt": "a cat\n"}), "INVALID_ARGUMENT", "A request field is out of range"),
    Case("cli-generator-not-running", "CLI flags", zsplit("generate", "a cat", "--generator", "{dead}", "--timeout", "10"), "UNAVAILABLE", "Is the service running and reachable?"),
    Case("cli-generate-size-the-server-refuses", "CLI flags", zsplit("generate", "a cat", "--generator", "{gen}", "--auth-token-file", "{token}", "--width", "1000", "--height", "64", "-o", "{tmp}/x.png"), "INVALID_ARGUMENT", "Width must be divisible by 16 (got 1000). Use 992 or 1008"),
    Case("cli-generate-shift-the-server-refuses", "CLI flags", zsplit("generate", "a cat", "--generator", "{gen}", "--auth-token-file", "{token}", "--width", "64", "--height", "64", "--shift", "0", "-o", "{tmp}/x.png"), "INVALID_ARGUMENT", "shift must be between 0.1 and 20 (got 0.0)"),
    Case("cli-batch-shift-the-server-refuses", "CLI flags", zsplit("generate", "--embeddings", "{emb}", "--generator", "{gen}", "--auth-token-file", "{token}", "--sizes", "64x64", "--shift", "40", "--out-dir", "{tmp}/out"), "INVALID_ARGUMENT", "shift must be between 0.1 and 20 (got 40.0)"),
    Case("cli-generate-slg-layers-not-numbers", "CLI flags", zsplit("generate", "a cat", "--generator", "{dead}", "--slg-layers", "middle"), "usage", "argument --slg-layers: 'middle' is not a list of DiT blocks; use e.g. 7-12 or 7,9,11"),
    Case("cli-generate-slg-start-after-stop", "CLI flags", zsplit("generate", "a cat", "--generator", "{gen}", "--auth-token-file", "{token}", "--width", "64", "--height", "64", "--slg-scale", "2", "--slg-layers", "1", "--slg-start", "0.7", "--slg-stop", "0.1", "-o", "{tmp}/x.png"), "INVALID_ARGUMENT", "slg_start (0.7) must be below slg_stop (0.1)"),
    Case("cli-generate-dype-method-unknown", "CLI flags", zsplit("generate", "a cat", "--generator", "{dead}", "--dype", "--dype-method", "yarn2"), "usage", "argument --dype-method: invalid choice: 'yarn2'"),
    Case("cli-generate-dype-scale-without-dype", "CLI flags", zsplit("generate", "a cat", "--generator", "{gen}", "--auth-token-file", "{token}", "--width", "64", "--height", "64", "--dype-scale", "3", "-o", "{tmp}/x.png"), "INVALID_ARGUMENT", "dype_method, dype_scale and dype_exponent need dype=True"),
    Case("cli-generate-dype-negative-exponent", "CLI flags", zsplit("generate", "a cat", "--generator", "{gen}", "--auth-token-file", "{token}", "--width", "64", "--height", "64", "--dype", "--dype-exponent", "-1", "-o", "{tmp}/x.png"), "INVALID_ARGUMENT", "dype_exponent must be between 0 and 10 (got -1.0)"),
    Case("cli-generate-pass-not-a-scale", "CLI flags", zsplit("generate", "a cat", "--generator", "{dead}", "--pass", "half"), "usage", "argument --pass: 'half' is not SCALE[:STEPS[:STRENGTH]]; use e.g. 0.5 or 1:8:0.5"),
    Case("cli-batch-with-passes", "CLI flags", zsplit("generate", "--embeddings", "{emb}", "--generator", "{dead}", "--out-dir", "{tmp}/out", "--pass", "0.5", "--pass", "1"), "INVALID_ARGUMENT", "A batch from --embeddings takes no --pass"),
    Case("cli-prompt-over-the-servers-message-limit", "CLI flags", zsplit("generate", "z" * OVERSIZED, "--generator", "{gen}", "--auth-token-file", "{token}", "-o", "{tmp}/x.png"), "RESOURCE_EXHAUSTED", "vs. 2097152)). Send less in one call (a shorter prompt, fewer prompts), or raise the server's --max-message-mb"),
    Case("cli-env-variable-not-a-number", "CLI flags", zsplit(*SERVE_ENCODER, env={"ZSPLIT_PORT": "fifty"}), "INVALID_ARGUMENT", "ZSPLIT_PORT: 'fifty' is not a valid port"),
    Case("cli-profile-without-config", "CLI flags", zsplit(*SERVE_ENCODER, "--profile", "prod"), "INVALID_ARGUMENT", "--profile needs a config file: pass --config FILE"),
    # -- Config TOML
    Case("config-missing-file", "config file", zsplit(*CONFIG), "NOT_FOUND", "No config file at"),
    Case("config-toml-syntax-error", "config file", zsplit(*CONFIG, files={TOML: "port = \n"}), "INVALID_ARGUMENT", "is not valid TOML"),
    Case("config-unknown-key", "config file", zsplit(*CONFIG, files={TOML: 'colour = "red"\n'}), "INVALID_ARGUMENT", "unknown setting 'colour'. Known: "),
    Case("config-token-in-the-file", "config file", zsplit(*CONFIG, files={TOML: '[encoder]\nauth_token = "s3cret"\n'}), "INVALID_ARGUMENT", "auth_token is a secret; put it in a file named by auth_token_file, or in ZSPLIT_AUTH_TOKEN"),
    Case("config-unknown-profile", "config file", zsplit(*CONFIG, "--profile", "prod", files={TOML: "[profiles.dev]\nport = 1\n"}), "NOT_FOUND", "No profile 'prod' in"),
    Case("config-value-of-the-wrong-type", "config file", zsplit(*CONFIG, files={TOML: '[encoder]\nport = "high"\n'}), "INVALID_ARGUMENT", "'high' is not a valid port"),
    Case("config-boolean-that-is-not", "config file", zsplit(*CONFIG, files={TOML: 'insecure = "maybe"\n'}), "INVALID_ARGUMENT", "'maybe' is not a boolean; use true or false"),
    Case("config-value-not-a-choice", "config file", zsplit(*CONFIG, files={TOML: '[encoder]\ndtype = "int8"\n'}), "INVALID_ARGUMENT", "'int8' is not one of auto, bfloat16, float16, float32"),
    Case("config-limit-out-of-range", "config file", zsplit(*CONFIG, files={TOML: "[encoder]\nmax_message_mb = 1\n"}), "INVALID_ARGUMENT", "--max-message-mb must be between 2 and 2047 (got 1)"),
    # -- Embeddings files (zsplit generate --embeddings): read and checked before any DiT work.
    Case("embeddings-missing", "embeddings file", zsplit(*BATCH, *TO_GENERATOR), "NOT_FOUND", "Make one with `zsplit encode -o"),
    Case("embeddings-empty-file", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": b""}), "DATA_LOSS", "is not a readable safetensors file"),
    Case("embeddings-truncated", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": damaged(lambda data: data[: len(data) // 2])}), "DATA_LOSS", "it may be truncated or corrupted. Make it again with `zsplit encode`"),
    Case("embeddings-last-bytes-missing", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": damaged(lambda data: data[:-4])}), "DATA_LOSS", "is not a readable safetensors file"),
    Case("embeddings-flipped-tensor-byte", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": damaged(lambda data: flip(data, len(data) - 1))}), "DATA_LOSS", "the tensor bytes do not match their blake3; the file is corrupted"),
    Case("embeddings-flipped-header-byte", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": damaged(lambda data: flip(data, 8))}), "DATA_LOSS", "is not a readable safetensors file"),
    Case("embeddings-not-safetensors", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": b"\x89PNG\r\n\x1a\n" + bytes(200)}), "DATA_LOSS", "is not a readable safetensors file"),
    Case("embeddings-someone-elses-safetensors", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": save({"weight": torch.zeros(4, 4)})}), "INVALID_ARGUMENT", "is a safetensors file but not a zimage-split embeddings file"),
    Case("embeddings-newer-file-version", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": embeddings_file(format_version="3")}), "INVALID_ARGUMENT", "has embeddings-file version '3'; this zimage-split reads versions 1, 2"),
    Case("embeddings-version-1-without-sha256", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": embeddings_file(format_version="1")}), "DATA_LOSS", "a prompt has no 'sha256'"),
    Case("embeddings-damaged-prompt-list", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": embeddings_file(prompts="[{")}), "DATA_LOSS", "header is damaged"),
    Case("embeddings-for-another-hidden-size", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": embeddings_file(valid_tensor(hidden=32))}), "INVALID_ARGUMENT", "These embeddings have hidden size 32"),
    Case("embeddings-for-another-model", "embeddings file", zsplit(*BATCH, *TO_GENERATOR, files={"in.safetensors": embeddings_file(model_id="someone/other-model")}), "INVALID_ARGUMENT", "or pass --allow-other-model if both name the same weights"),
    # -- Prompt files (zsplit encode --prompts)
    Case("prompts-missing", "prompt file", zsplit(*ENCODE, "--prompts", "{tmp}/missing.txt"), "NOT_FOUND", "No prompt file at"),
    Case("prompts-invalid-utf8", "prompt file", zsplit(*ENCODE, "--prompts", "{tmp}/p.txt", files={"p.txt": b"fine\ncaf\xe9 latin-1\n"}), "INVALID_ARGUMENT", "p.txt, line 2: not valid UTF-8 (byte 0xe9 at column 4). Save the file as UTF-8"),
    Case("prompts-bad-jsonl-line", "prompt file", zsplit(*ENCODE, "--prompts", "{tmp}/p.jsonl", files={"p.jsonl": '"fine"\n{"prompt": \n'}), "INVALID_ARGUMENT", "p.jsonl, line 2: not valid JSON"),
    Case("prompts-jsonl-object-without-prompt", "prompt file", zsplit(*ENCODE, "--prompts", "{tmp}/p.jsonl", files={"p.jsonl": '{"text": "a cat"}\n'}), "INVALID_ARGUMENT", 'must be a string or an object with a "prompt" string'),
    Case("prompts-only-empty-lines", "prompt file", zsplit(*ENCODE, "--prompts", "{tmp}/p.txt", files={"p.txt": "\n  \n\n"}), "INVALID_ARGUMENT", "has no prompts; write one prompt per line"),
    Case("prompts-over-the-encoders-limit", "prompt file", zsplit(*ENCODE, "--prompts", "{tmp}/p.txt", files={"p.txt": "short\n" + "x" * 1001 + "\n"}), "INVALID_ARGUMENT", "Prompt 1 is 1001 bytes of UTF-8; this encoder takes at most 1000 (--max-prompt-bytes)"),
    Case("prompts-a-folder", "prompt file", zsplit(*ENCODE, "--prompts", "{tmp}"), "INVALID_ARGUMENT", "is a folder, not a prompt file"),
    # -- PEM files: parsed when the command starts, not when the server binds (after the model loaded).
    Case("pem-server-certificate-missing", "PEM file", zsplit("serve", "encoder", "--model", "{model}", "--tls-cert", "{tmp}/no.crt", "--tls-key", "{tmp}/no.key"), "INVALID_ARGUMENT", "Cannot read the TLS certificate"),
    Case("pem-server-certificate-not-pem", "PEM file", zsplit("serve", "encoder", "--model", "{model}", "--tls-cert", "{tmp}/c.crt", "--tls-key", "{certs}/encoder.key", files={"c.crt": NOT_PEM}), "INVALID_ARGUMENT", "is not PEM (no '-----BEGIN' line)"),
    Case("pem-server-certificate-garbled", "PEM file", zsplit("serve", "encoder", "--model", "{model}", "--tls-cert", "{tmp}/c.crt", "--tls-key", "{certs}/encoder.key", files={"c.crt": PEM_LOOKING}), "INVALID_ARGUMENT", "holds no usable PEM certificate"),
    Case("pem-server-key-of-another-certificate", "PEM file", zsplit("serve", "encoder", "--model", "{model}", "--tls-cert", "{certs}/encoder.crt", "--tls-key", "{certs}/generator.key"), "INVALID_ARGUMENT", "does not belong to the certificate"),
    Case("pem-server-key-is-a-certificate", "PEM file", zsplit("serve", "encoder", "--model", "{model}", "--tls-cert", "{certs}/encoder.crt", "--tls-key", "{certs}/encoder.crt"), "INVALID_ARGUMENT", "is not a usable PEM private key"),
    Case("pem-client-ca-of-server-missing", "PEM file", zsplit("serve", "encoder", "--model", "{model}", "--tls-cert", "{certs}/encoder.crt", "--tls-key", "{certs}/encoder.key", "--tls-client-ca", "{tmp}/no-ca.crt"), "INVALID_ARGUMENT", "Cannot read the client CA certificate"),
    Case("pem-generate-ca-missing", "PEM file", zsplit("generate", "a cat", "--generator", "10.1.2.3:50052", "--tls-ca", "{tmp}/no-ca.crt"), "INVALID_ARGUMENT", "Cannot read the CA certificate"),
    Case("pem-generators-encoder-ca-not-pem", "PEM file", zsplit("serve", "generator", "--model", "{model}", "--insecure", "--encoder", "10.1.2.3:50051", "--encoder-tls-ca", "{tmp}/ca.crt", files={"ca.crt": NOT_PEM}), "INVALID_ARGUMENT", "The CA certificate"),
    # -- Token files
    Case("token-file-missing", "token file", zsplit(*SERVE_ENCODER, "--auth-token-file", "{tmp}/no-token"), "INVALID_ARGUMENT", "Cannot read the token file"),
    Case("token-file-empty", "token file", zsplit(*SERVE_ENCODER, "--auth-token-file", "{tmp}/t", files={"t": "# just a comment\n\n"}), "INVALID_ARGUMENT", "holds no token; write one token per line"),
    Case("token-file-with-the-wrong-token", "token file", zsplit("generate", "a cat", "--generator", "{gen}", "--auth-token-file", "{tmp}/t", "-o", "{tmp}/x.png", files={"t": "not-the-token\n"}), "UNAUTHENTICATED", "send 'authorization: Bearer <token>'"),
    Case("token-file-not-utf8", "token file", zsplit(*SERVE_ENCODER, "--auth-token-file", "{tmp}/t", files={"t": b"\xff\xfe\x00"}), "INVALID_ARGUMENT", "Cannot read the token file"),
    # -- Output paths: refused before the work, not after it.
    Case("serve-http-without-tls-or-insecure", "CLI flags", zsplit("serve", "http"), "INVALID_ARGUMENT", "needs --tls-cert and --tls-key, or --insecure"),
    Case("serve-http-insecure-and-tls", "CLI flags", zsplit("serve", "http", "--insecure", "--tls-cert", "{tmp}/c.pem", "--tls-key", "{tmp}/k.pem"), "INVALID_ARGUMENT", "--insecure (plain HTTP) contradicts --tls-cert, --tls-key (HTTPS)"),
    Case("serve-metrics-port-out-of-range", "CLI flags", zsplit(*SERVE_ENCODER, "--metrics-port", "70000"), "INVALID_ARGUMENT", "--metrics-port must be between 0 and 65535"),
    Case("serve-metrics-port-is-the-service-port", "CLI flags", zsplit(*SERVE_GENERATOR, "--port", "50999", "--metrics-port", "50999"), "INVALID_ARGUMENT", "is the service's own --port; pick another"),
    Case("cli-log-format-not-a-choice", "CLI flags", zsplit("--log-format", "yaml", "templates"), "usage", "argument --log-format: invalid choice: 'yaml'"),
    Case("batch-with-init-image", "CLI flags", zsplit("generate", "--embeddings", "{tmp}/e.safetensors", "--init-image", "{tmp}/a.png"), "INVALID_ARGUMENT", "A batch from --embeddings takes no --init-image"),
    Case("generate-lora-scale-not-a-number", "CLI flags", zsplit("generate", "a cat", "--generator", "{dead}", "--lora", "style:strong"), "INVALID_ARGUMENT", "the scale after ':' must be a number"),
    Case("cli-generate-controlnet-without-control-image", "CLI flags", zsplit("generate", "a cat", "--generator", "{dead}", "--controlnet", "cn"), "INVALID_ARGUMENT", "--controlnet NAME and --control-image PATH go together"),
    Case("cli-generate-control-image-missing", "CLI flags", zsplit("generate", "a cat", "--generator", "{dead}", "--controlnet", "cn", "--control-image", "{tmp}/c.png"), "INVALID_ARGUMENT", "c.png: no such file"),
    Case("cli-generate-controlnet-unknown", "CLI flags", zsplit("generate", "a cat", "--generator", "{gen}", "--auth-token-file", "{token}", "--controlnet", "pose", "--control-image", "{tmp}/c.png", "-o", "{tmp}/x.png", files={"c.png": png_file()}), "NOT_FOUND", "No ControlNet 'pose' on this generator. Loaded: 'cn'."),
    Case("cli-batch-controlnet", "CLI flags", zsplit("generate", "--embeddings", "{emb}", "--generator", "{dead}", "--controlnet", "cn", "--control-image", "{tmp}/c.png", "--out-dir", "{tmp}/out", files={"c.png": png_file()}), "INVALID_ARGUMENT", "takes no --controlnet, --control-image"),
    Case("cli-serve-controlnet-not-name-path", "CLI flags", zsplit(*SERVE_GENERATOR, "--controlnet", "{tmp}/cn"), "INVALID_ARGUMENT", "give NAME=PATH"),
    Case("cli-serve-controlnet-missing", "CLI flags", zsplit(*SERVE_GENERATOR, "--controlnet", "cn={tmp}/cn"), "INVALID_ARGUMENT", "/cn: no such file or folder"),
    Case("cli-serve-controlnet-pickle", "CLI flags", zsplit(*SERVE_GENERATOR, "--controlnet", "cn={tmp}/cn.bin", files={"cn.bin": b"not safetensors"}), "INVALID_ARGUMENT", "only .safetensors files are loaded (never pickled"),
    Case("generate-mask-file-missing", "CLI flags", zsplit("generate", "a cat", "--generator", "{dead}", "--mask", "{tmp}/m.png"), "INVALID_ARGUMENT", "no such file"),
    Case("generate-unknown-template", "CLI flags", zsplit("generate", "a cat", "--generator", "{dead}", "--template", "nope"), "INVALID_ARGUMENT", "nope"),
    Case("output-unknown-suffix", "output path", zsplit("generate", "a cat", "--generator", "{dead}", "--output", "{tmp}/x.gif"), "INVALID_ARGUMENT", "the suffix says the file format"),
    Case("output-png-under-a-file", "output path", zsplit("generate", "a cat", "--generator", "{dead}", "--output", "{tmp}/a-file/x.png", files={"a-file": "x"}), "FAILED_PRECONDITION", "/a-file is not a folder, or a part of its path is a file (File exists while creating it)"),
    Case("output-png-is-a-folder", "output path", zsplit("generate", "a cat", "--generator", "{dead}", "--output", "{tmp}/x.png", files={"x.png/inside": "x"}), "FAILED_PRECONDITION", "/x.png is a folder; pass a file name"),
    Case("output-out-dir-under-a-file", "output path", zsplit("generate", "--embeddings", "{emb}", "--generator", "{dead}", "--out-dir", "{tmp}/a-file/out", files={"a-file": "x"}), "FAILED_PRECONDITION", "/a-file/out is not a folder (Not a directory while creating it). Nothing was generated."),
    Case("output-out-dir-on-proc", "output path", zsplit("generate", "--embeddings", "{emb}", "--generator", "{dead}", "--out-dir", "/proc/zsplit-out"), "FAILED_PRECONDITION", "The output folder /proc/zsplit-out cannot be created: its folder is gone, or takes no new files (No such file or directory while creating it)"),
    Case("output-embedding-store-under-a-file", "output path", zsplit(*SERVE_GENERATOR, "--embedding-store", "{tmp}/a-file/store", files={"a-file": "x"}), "FAILED_PRECONDITION", "/a-file/store is not a folder, or a part of its path is a file (Not a directory while creating it)"),
    Case("output-embedding-store-max-gb-without-a-store", "output path", zsplit(*SERVE_GENERATOR, "--embedding-store-max-gb", "1"), "INVALID_ARGUMENT", "pass --embedding-store DIR too"),
    Case("output-embedding-store-max-gb-0", "output path", zsplit(*SERVE_GENERATOR, "--embedding-store", "{tmp}/store", "--embedding-store-max-gb", "0"), "INVALID_ARGUMENT", "--embedding-store-max-gb must be above 0"),
    Case("output-embeddings-not-safetensors", "output path", zsplit("encode", "--prompts", "{tmp}/p.txt", "-o", "{tmp}/e.bin", "--encoder", "{dead}", files={"p.txt": "a cat\n"}), "INVALID_ARGUMENT", "must end in .safetensors"),
    Case("output-embeddings-under-a-file", "output path", zsplit("encode", "--prompts", "{tmp}/p.txt", "-o", "{tmp}/a-file/e.safetensors", "--encoder", "{dead}", files={"p.txt": "a cat\n", "a-file": "x"}), "FAILED_PRECONDITION", "/a-file is not a folder, or a part of its path is a file"),
]
# fmt: on


def case_params(cases: list[Case]) -> list[Any]:
    return [pytest.param(case, id=case.name) for case in cases]


@pytest.fixture
def trapped_model_loaders(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI cases never load a model: a command that gets that far has failed to refuse its input."""

    def trap(*args: object, **kwargs: object) -> None:
        raise ModelLoadStarted

    monkeypatch.setattr("zimage_split.encoder_service.server.TextEncoder", trap)
    monkeypatch.setattr("zimage_split.dit_service.engine.DiTEngine", trap)  # what start_engine builds
    for name in [name for name in os.environ if name.startswith("ZSPLIT_")]:
        if name != "ZSPLIT_RELIABILITY_FIGURES":
            monkeypatch.delenv(name)


@pytest.mark.parametrize("case", case_params(TABLE))
def test_bad_input(
    case: Case,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    trapped_model_loaders: None,
) -> None:
    bench = Bench(request, tmp_path, capsys, monkeypatch)
    outcome = case.action(bench)
    assert outcome.code == case.code, f"{case.name}: got {outcome.code}: {outcome.message}"
    if case.fix is None:
        assert outcome.message == "", outcome.message
    else:
        assert case.fix in outcome.message, f"{case.name}: {outcome.message!r}"
    if bench.used_servers:
        bench.servers.assert_serving(after=case.name)


def test_the_table_covers_every_rpc_the_cli_and_the_files(figures: Figures) -> None:
    counts = Counter(case.target for case in TABLE)
    assert len({case.name for case in TABLE}) == len(TABLE), "case names must be unique"
    assert set(counts) == set(TARGETS), set(TARGETS) ^ set(counts)
    assert len(TABLE) >= 40
    figures.record(SECTION, "table cases", len(TABLE))
    for target in TARGETS:
        figures.record(SECTION, f"cases: {target}", counts[target])


# Measured on a 2-core box: fds and threads do not move at all, and RSS after the warm-up grows by under
# 1 MiB per 1,000 small bad requests. The bounds leave room for that and for gRPC opening a socket of its own.
FD_SLACK = 2
THREAD_SLACK = 0
# A leak of 20 KiB per request would add 20 MiB over 1,000 requests.
RSS_SLACK = 10 * MiB
# Each message over the limit takes gRPC 0.1 to 0.9 s to refuse (not our code: nothing of ours runs) and
# makes RSS swing by several MiB as 2 MiB buffers come and go, so they get a smaller round of their own,
# whose bound would still catch a server that kept each refused body (40 x 2 MiB).
OVER_LIMIT_REQUESTS = 40
OVER_LIMIT_RSS_SLACK = 32 * MiB


@dataclass
class Round:
    """Bad requests sent in turn over the module's two channels, with both servers' /proc stats around them."""

    cases: list[Case]
    seconds: float = 0.0
    codes: Counter[str] = field(default_factory=Counter)
    before: dict[str, ProcessStats] = field(default_factory=dict)
    after: dict[str, ProcessStats] = field(default_factory=dict)

    def send(self, servers: Servers, warm_up: int, count: int) -> Round:
        bench = Bench(given_servers=servers)

        def send(indices: range) -> None:
            for index in indices:
                case = self.cases[index % len(self.cases)]
                outcome = case.action(bench)
                assert outcome.code == case.code, f"request {index} ({case.name}): {outcome}"
                self.codes[outcome.code] += 1

        send(range(warm_up))  # gRPC's pools, our caches and the allocator settle
        self.codes.clear()
        self.before = {process.service: process.stats() for process in servers.processes()}
        started = time.monotonic()
        send(range(warm_up, warm_up + count))
        self.seconds = time.monotonic() - started
        self.after = {process.service: process.stats() for process in servers.processes()}
        servers.assert_serving(after=f"{count} bad requests")
        return self

    def record(self, figures: Figures, what: str) -> None:
        for service in ("generator", "encoder"):
            first, last = self.before[service], self.after[service]
            name = f"{service} after {what}"
            figures.record(SECTION, f"{name}: open fds", f"{first.open_fds} → {last.open_fds}")
            figures.record(SECTION, f"{name}: threads", f"{first.threads} → {last.threads}")
            figures.record(
                SECTION,
                f"{name}: RSS",
                f"{first.rss_bytes / MiB:.1f} → {last.rss_bytes / MiB:.1f}",
                "MiB",
                note=f"{(last.rss_bytes - first.rss_bytes) / 1024:+.0f} KiB",
            )
        codes = ", ".join(f"{code} {count}" for code, count in sorted(self.codes.items()))
        note = f"{len(self.cases)} RPC cases in turn, one channel per server; {codes}"
        figures.record(SECTION, f"{what}: wall time", round(self.seconds, 2), "s", note=note)

    def assert_flat(self, rss_slack: int) -> None:
        for service in ("generator", "encoder"):
            first, last = self.before[service], self.after[service]
            assert last.open_fds <= first.open_fds + FD_SLACK, (service, first, last)
            assert last.threads <= first.threads + THREAD_SLACK, (service, first, last)
            assert last.rss_bytes - first.rss_bytes < rss_slack, (service, first, last)


def over_message_limit(case: Case) -> bool:
    return case.code == "RESOURCE_EXHAUSTED"


def test_1000_bad_requests_leave_fds_threads_and_memory_flat(servers: Servers, figures: Figures) -> None:
    cases = [case for case in TABLE if case.rpc and not over_message_limit(case)]
    measured = Round(cases).send(servers, warm_up=100, count=1000)
    measured.record(figures, "1,000 bad requests")
    measured.assert_flat(RSS_SLACK)


def test_messages_over_the_limit_leave_fds_threads_and_memory_flat(
    servers: Servers, figures: Figures
) -> None:
    cases = [case for case in TABLE if case.rpc and over_message_limit(case)]
    measured = Round(cases).send(servers, warm_up=len(cases), count=OVER_LIMIT_REQUESTS)
    measured.record(figures, f"{OVER_LIMIT_REQUESTS} messages over --max-message-mb")
    measured.assert_flat(OVER_LIMIT_RSS_SLACK)


def test_a_normal_request_still_succeeds(servers: Servers) -> None:
    security = ClientSecurity.plaintext(token=TOKEN)
    with Client(
        generator=servers.generator.address, encoder=servers.encoder.address, security=security, timeout=60
    ) as client:
        assert client.generate("still serving", seed=0, width=64, height=64, steps=1).size == (64, 64)
        assert client.encode(["still serving"])[0].tensor.shape[1] == 16
    servers.assert_serving(after="the bad-input table")
