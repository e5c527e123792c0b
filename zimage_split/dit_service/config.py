"""What a generator can be set to (`zsplit serve generator`), as frozen dataclasses checked when they are built,
so a server started from Python refuses a bad value with the same error as the command line."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from zimage_split.common.encoder_pool import parse_encoder_addresses
from zimage_split.common.errors import InvalidArgument
from zimage_split.common.security import ClientSecurity, ServerSecurity
from zimage_split.common.server import TransportLimits, check_bounds, check_metrics_port
from zimage_split.common.vocabulary import ENCODER_PORT, GENERATOR_PORT
from zimage_split.dit_service.controlnets import ControlNetSpec

if TYPE_CHECKING:
    import torch

    from zimage_split.dit_service.engine import DiTEngine
    from zimage_split.model_source import ModelSource

# Request fields on the wire are uint32.
UINT32 = 2**32 - 1


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this generator (`zsplit serve generator --max-pixels ...`)."""

    size_multiple: int = 16
    min_side: int = 64
    max_side: int = 4096
    max_pixels: int = 2048 * 2048
    max_steps: int = 100
    max_guidance_scale: float = 30.0
    # Prompt text, checked before the encoder is asked (the encoder has its own limit).
    max_prompt_bytes: int = 64 << 10
    max_images_per_request: int = 4
    # Uploaded start images and masks (UploadImage): file bytes, and pixels once decoded. Larger than any
    # output, since a start image is resized to the requested size.
    max_upload_bytes: int = 64 << 20
    max_upload_pixels: int = 8192 * 8192


# --attention: auto (the fastest that works here; native off CUDA), or one of diffusers' backends.
ATTENTION_BACKENDS = ("auto", "native", "flash", "_flash_3", "sage")
# --vae-tiling: auto (from 2048x2048 pixels), on, off.
VAE_TILING_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class EngineOptions:
    """How a generator runs its engine (--attention, --compile, --vae-tiling, LoRA, ControlNets) and warms it up.

    One value for the in-process worker and every Ray replica. The engine module, and torch with it, is
    imported only by the methods that use it, so the CLI can read these defaults without loading torch.
    """

    # Attention kernel: auto (the fastest that works here; native off CUDA), native, flash, _flash_3, sage.
    attention: str = "auto"
    # Regional torch.compile of the DiT blocks, compiled during warm-up, before health reports SERVING.
    compile: bool = False
    # VAE decode in tiles: auto (from 2048x2048 pixels), on, off.
    vae_tiling: str = "auto"
    # Folder of LoRA files requests may name (--lora-dir; None turns LoRA off), and adapters kept loaded.
    lora_dir: str | None = None
    lora_cache: int = 8
    # ControlNets requests may name (--controlnet NAME=PATH), loaded by every replica.
    controlnets: tuple[ControlNetSpec, ...] = ()
    # The square side compiled graphs are warmed up at, and whether guided batches are warmed up too.
    warm_up_side: int = 1024
    warm_up_guidance: bool = True

    def __post_init__(self) -> None:
        if self.lora_cache < 1:
            raise InvalidArgument(f"--lora-cache must be at least 1 (got {self.lora_cache}).")

    def resolved(self, device: torch.device, dtype: torch.dtype) -> EngineOptions:
        """These options with `auto` attention decided for `device`; raises InvalidArgument (saying the fix)
        for options that cannot work there. Loads nothing.
        """
        from zimage_split.dit_service.attention import choose_attention
        from zimage_split.dit_service.engine import check_engine_options

        check_engine_options(
            device, dtype, attention=self.attention, compile=self.compile, vae_tiling=self.vae_tiling
        )
        return replace(self, attention=choose_attention(self.attention, device, dtype).backend)

    def start_engine(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype, dtype_reason: str = ""
    ) -> DiTEngine:
        """Loads the engine and warms it up (compiling it with --compile)."""
        from zimage_split.dit_service.engine import DiTEngine

        engine = DiTEngine(
            source,
            device=device,
            dtype=dtype,
            attention=self.attention,
            compile=self.compile,
            vae_tiling=self.vae_tiling,
            lora_dir=self.lora_dir or None,
            lora_cache=self.lora_cache,
            dtype_reason=dtype_reason,
            controlnets=self.controlnets,
        )
        engine.warm_up(self.warm_up_side, guidance=self.warm_up_guidance)
        return engine


@dataclass(frozen=True)
class RayOptions:
    """`zsplit serve generator --ray-address ... --replicas ...`: run the replicas under Ray Serve."""

    address: str = "local"  # "local" starts Ray in this process; "auto" or HOST:PORT joins a cluster
    replicas: int | None = 1  # None ("auto"): one per GPU, growing as GPU hosts join the cluster
    max_batch_size: int = 4
    max_batch_wait_ms: float = 10.0
    torch_threads: int = 0  # torch threads per replica; 0 keeps Ray's default (one per reserved CPU)
    cpus_per_replica: float = 1.0
    # Start-up fails if the replicas are not all serving by then (pending for resources, or loading).
    start_timeout_s: float = 600.0
    # Start-up fails after this many failed replica starts (Serve would restart them without end).
    max_start_failures: int = 3

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise InvalidArgument(f"--replicas takes 'auto' or a positive number (got {self.replicas!r}).")
        if self.cpus_per_replica < 0:
            raise InvalidArgument(f"--cpus-per-replica cannot be negative (got {self.cpus_per_replica:g}).")
        if not self.start_timeout_s > 0:
            raise InvalidArgument(
                f"--replica-start-timeout takes a positive number of seconds (got {self.start_timeout_s:g})."
            )
        check_bounds(
            [
                ("--max-batch-size", self.max_batch_size, 1, None, "a batch holds one request or more"),
                (
                    "--replica-start-failures",
                    self.max_start_failures,
                    1,
                    None,
                    "start-up gives up after that many failed replica starts",
                ),
            ]
        )


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything `zsplit serve generator` can set, resolved once."""

    model: str
    # One encoder HOST:PORT, several separated by commas, or dns:NAME:PORT (common.encoder_pool); None: none.
    encoder: str | None = f"127.0.0.1:{ENCODER_PORT}"
    # None: one in-process worker. Otherwise the replicas run under Ray Serve.
    ray: RayOptions | None = None
    host: str = "127.0.0.1"
    port: int = GENERATOR_PORT
    device: str = "auto"
    dtype: str = "auto"
    engine: EngineOptions = EngineOptions()
    max_queue: int = 32
    cache_bytes: int = 2 << 30
    # A folder of <key>.safetensors embeddings behind the in-memory cache; survives restarts.
    embedding_store: str | None = None
    # Bytes that folder may hold (least recently used files go first); None: no limit.
    embedding_store_max_bytes: int | None = None
    # Finished images kept by request_id, so a retried request is answered without running again.
    completed_cache_bytes: int = 128 << 20
    # Decoded start images and masks from UploadImage, kept for Generate.
    image_cache_bytes: int = 256 << 20
    limits: Limits = Limits()
    transport: TransportLimits = TransportLimits()
    # Prometheus metrics on http(s)://HOST:PORT/metrics (None or 0: not served); the host defaults to `host`,
    # TLS is the service's own (security), and requests need a token of `metrics_token_file` when it is set.
    metrics_port: int | None = None
    metrics_host: str | None = None
    metrics_token_file: str | None = None
    # Extra tries of an encoder call that failed with UNAVAILABLE (a restart, a dropped connection), within
    # the caller's deadline.
    encoder_retries: int = 2
    # Plaintext suits the default loopback address; the CLI makes --insecure explicit.
    security: ServerSecurity = ServerSecurity(insecure=True)
    # How this generator reaches its encoder: TLS, its client certificate, its token.
    encoder_security: ClientSecurity = ClientSecurity(insecure=True)

    def __post_init__(self) -> None:
        check_metrics_port(self.port, self.metrics_port)
        if self.ray is not None and self.device.startswith("cuda:"):
            raise InvalidArgument(
                f"--device {self.device} with --ray-address: Ray gives each replica GPUs of its own and hides "
                "the others (CUDA_VISIBLE_DEVICES), so a replica's GPU is always cuda:0 to it. Pass --device "
                "cuda (or auto) and choose how many GPUs with --replicas."
            )
        if self.encoder is not None:  # checked, each entry with its port (a bare host gets 50051)
            object.__setattr__(self, "encoder", ",".join(parse_encoder_addresses(self.encoder)))
        if self.embedding_store_max_bytes is not None:
            if not self.embedding_store:
                raise InvalidArgument(
                    "--embedding-store-max-gb limits the --embedding-store folder; pass --embedding-store DIR too."
                )
            if self.embedding_store_max_bytes <= 0:
                raise InvalidArgument(
                    f"--embedding-store-max-gb must be above 0 (got {self.embedding_store_max_bytes} bytes); "
                    "leave it unset for no limit."
                )
        # Limits no request could meet, or that gRPC cannot hold, fail here rather than after the model loads.
        check_bounds(
            [
                ("--port", self.port, 0, 65535, "0 picks a free port"),
                ("--max-prompt-bytes", self.limits.max_prompt_bytes, 1, None, "0 would refuse every prompt"),
                (
                    "--max-pixels",
                    self.limits.max_pixels,
                    64 * 64,
                    UINT32,
                    "the smallest image, 64x64, needs 4096",
                ),
                ("--max-steps", self.limits.max_steps, 1, UINT32, "an image needs at least one step"),
                ("--max-queue", self.max_queue, 1, None, "0 would refuse every request"),
                ("--encoder-retries", self.encoder_retries, 0, None, "0 tries the encoder once"),
                (
                    "--max-images-per-request",
                    self.limits.max_images_per_request,
                    1,
                    None,
                    "a request makes one image or more",
                ),
            ]
        )
