"""What an encoder can be set to (`zsplit serve encoder`), as a frozen dataclass checked when it is built,
so a server started from Python refuses a bad value with the same error as the command line."""

from __future__ import annotations

from dataclasses import dataclass

from zimage_split.common.errors import InvalidArgument
from zimage_split.common.security import ServerSecurity
from zimage_split.common.server import TransportLimits, check_bounds, check_metrics_port
from zimage_split.common.vocabulary import ENCODER_PORT
from zimage_split.encoder_service.quantization import check_quantize_setting

MAX_PROMPTS_PER_CALL = 64
# About 16k tokens of English: room for long prompts, far from what would tie up the tokenizer.
MAX_PROMPT_BYTES = 64 << 10
DEFAULT_MAX_SEQUENCE_LENGTH = 512
# How prompts queued together are encoded: "exact" runs one forward pass per prompt (an embedding is
# bit-identical to its prompt encoded alone); "padded" right-pads them into one pass (faster on a CPU at
# batch >= 4, but the last bits of an embedding then depend on the prompts it shared the pass with).
ENCODE_BATCHING = ("exact", "padded")


def check_batching(batching: str) -> None:
    if batching not in ENCODE_BATCHING:
        raise InvalidArgument(
            f"--batching must be {' or '.join(ENCODE_BATCHING)} (got {batching!r}); exact keeps every "
            "embedding bit-identical to its prompt encoded alone."
        )


@dataclass(frozen=True)
class EncoderConfig:
    """Everything `zsplit serve encoder` can set, resolved once."""

    model: str
    host: str = "127.0.0.1"
    port: int = ENCODER_PORT
    device: str = "auto"
    # auto: bf16 on CUDA, MPS and CPUs with native bf16 matrix instructions, else fp32 (devices.choose_dtype).
    dtype: str = "auto"
    # int8: int8 weights with dynamic int8 activations, CPU only, float32 elsewhere (quantization.py).
    quantize: str = "none"
    hidden_layer: int = -2
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    cache_bytes: int = 1 << 30
    max_batch_size: int = 16
    max_batch_wait_ms: float = 5.0
    batching: str = "exact"
    # CPU, bf16 or fp32: hold the linear layers' weights packed for oneDNN (packed_linear.py).
    pack_weights: bool = True
    max_prompt_bytes: int = MAX_PROMPT_BYTES
    max_prompts_per_request: int = MAX_PROMPTS_PER_CALL
    transport: TransportLimits = TransportLimits()
    # Prometheus metrics on http(s)://HOST:PORT/metrics (None or 0: not served); the host defaults to `host`,
    # TLS is the service's own (security), and requests need a token of `metrics_token_file` when it is set.
    metrics_port: int | None = None
    metrics_host: str | None = None
    metrics_token_file: str | None = None
    # Plaintext suits the default loopback address; the CLI makes --insecure explicit.
    security: ServerSecurity = ServerSecurity(insecure=True)

    def __post_init__(self) -> None:
        check_metrics_port(self.port, self.metrics_port)
        check_batching(self.batching)
        check_quantize_setting(self.quantize, device=self.device, dtype=self.dtype)
        # Limits no request could meet fail here rather than after the model loads; the model's own caption
        # limit is checked once its config is read (servicer.check_default_length).
        check_bounds(
            [
                ("--port", self.port, 0, 65535, "0 picks a free port"),
                ("--max-prompt-bytes", self.max_prompt_bytes, 1, None, "0 would refuse every prompt"),
                ("--max-prompts-per-request", self.max_prompts_per_request, 1, None, "0 refuses every call"),
                (
                    "--max-sequence-length",
                    self.max_sequence_length,
                    1,
                    4096,
                    f"the default is {DEFAULT_MAX_SEQUENCE_LENGTH} tokens",
                ),
                ("--max-batch-size", self.max_batch_size, 1, None, "a forward pass takes one prompt or more"),
            ]
        )
