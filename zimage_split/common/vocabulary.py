"""The words the services, the SDK and the CLI share: long-prompt modes, output formats, default ports, and
how each word maps onto the enum of each proto that carries it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from zimage_split._proto.encoder.v1 import encoder_pb2
from zimage_split._proto.generator.v1 import generator_pb2
from zimage_split.common.errors import InvalidArgument

ENCODER_PORT = 50051
GENERATOR_PORT = 50052
HTTP_PORT = 8000
# Seconds a client call may take before the SDK and the CLI give up (`timeout=`, `--timeout`).
DEFAULT_TIMEOUT_SECONDS = 600.0
# The tensor dtypes the services compute in and the wire carries (`--dtype`).
DTYPES = ("bfloat16", "float16", "float32")
# How the encoder's linear layers hold their weights (`--quantize`): "int8" is int8 weights with dynamic int8
# activations, on the CPU only.
QUANTIZATIONS = ("none", "int8")

# How a prompt longer than max_sequence_length becomes exactly that many rows: "truncate" keeps the first
# tokens (as diffusers), "interpolate" resamples linearly along the tokens, "pool" averages adaptively.
LONG_PROMPT_MODES = ("truncate", "interpolate", "pool")
DEFAULT_LONG_PROMPT_MODE = "truncate"

# How DyPE extrapolates the DiT's image positions (`dype_method`): see zimage_split/dit_service/dype.py.
DYPE_METHODS = ("vision_yarn", "ntk", "pi")

OUTPUT_FORMATS = ("png", "jpeg", "webp", "latent")
DEFAULT_OUTPUT_FORMAT = "png"
QUALITY_FORMATS = ("jpeg", "webp")
# The file name suffix each format is written with, and the format a suffix asks for.
FORMAT_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "latent": ".safetensors"}
SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".safetensors": "latent"}


Number = TypeVar("Number", bound=int)


@dataclass(frozen=True)
class WireNames(Generic[Number]):
    """A name <-> number map for one proto enum whose zero value is *_UNSPECIFIED.

    The two protos are versioned apart, so each enum gets its own map: nothing relies on equal numbers.
    """

    what: str
    unspecified: Number
    numbers: Mapping[str, Number]
    names: Mapping[int, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", {number: name for name, number in self.numbers.items()})

    def number(self, name: str | None) -> Number:
        """The wire number of `name`; None or "" is UNSPECIFIED."""
        if not name:
            return self.unspecified
        if name not in self.numbers:
            raise InvalidArgument(f"Unknown {self.what} {name!r}; use one of {', '.join(self.numbers)}.")
        return self.numbers[name]

    def name(self, number: int, unspecified: str) -> str:
        """The name of a wire number; UNSPECIFIED reads as `unspecified` (the default, or "" for none)."""
        if number == self.unspecified:
            return unspecified
        if number not in self.names:
            *others, last = (name.upper() for name in self.numbers)
            raise InvalidArgument(f"Unknown {self.what} {number}; use {', '.join(others)} or {last}.")
        return self.names[number]

    def reported(self, number: int) -> str:
        """The name of a number a service reported: "" for UNSPECIFIED, and for a number this version does
        not know (a newer service), so a reply is never refused for what it merely describes."""
        return self.names.get(number, "")


ENCODER_LONG_PROMPT_MODE = WireNames(
    "long_prompt_mode",
    encoder_pb2.LONG_PROMPT_MODE_UNSPECIFIED,
    {
        "truncate": encoder_pb2.LONG_PROMPT_MODE_TRUNCATE,
        "interpolate": encoder_pb2.LONG_PROMPT_MODE_INTERPOLATE,
        "pool": encoder_pb2.LONG_PROMPT_MODE_POOL,
    },
)
GENERATOR_LONG_PROMPT_MODE = WireNames(
    "long_prompt_mode",
    generator_pb2.LONG_PROMPT_MODE_UNSPECIFIED,
    {
        "truncate": generator_pb2.LONG_PROMPT_MODE_TRUNCATE,
        "interpolate": generator_pb2.LONG_PROMPT_MODE_INTERPOLATE,
        "pool": generator_pb2.LONG_PROMPT_MODE_POOL,
    },
)
OUTPUT_FORMAT = WireNames(
    "output_format",
    generator_pb2.OUTPUT_FORMAT_UNSPECIFIED,
    {
        "png": generator_pb2.OUTPUT_FORMAT_PNG,
        "jpeg": generator_pb2.OUTPUT_FORMAT_JPEG,
        "webp": generator_pb2.OUTPUT_FORMAT_WEBP,
        "latent": generator_pb2.OUTPUT_FORMAT_LATENT,
    },
)
