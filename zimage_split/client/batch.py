"""Batch jobs: P prompts x K seeds x S sizes, planned up front with deterministic names and request ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from zimage_split.common.errors import InvalidArgument
from zimage_split.common.wire import MAX_SEED


@dataclass(frozen=True)
class ImageJob:
    """One image of a batch: which prompt, which seed, which size."""

    prompt_index: int
    seed: int
    width: int
    height: int

    @property
    def file_name(self) -> str:
        return f"p{self.prompt_index:05d}_s{self.seed}_{self.width}x{self.height}.png"


@dataclass(frozen=True)
class JobResult:
    job: ImageJob
    image: Image.Image


def plan_jobs(prompt_count: int, seeds: Iterable[int], sizes: Iterable[tuple[int, int]]) -> list[ImageJob]:
    """Every (prompt, size, seed) once, prompt by prompt."""
    seed_list, size_list = list(dict.fromkeys(seeds)), list(dict.fromkeys(sizes))
    if prompt_count < 1 or not seed_list or not size_list:
        raise InvalidArgument("A batch needs at least one prompt, one seed and one size.")
    return [
        ImageJob(prompt, seed, width, height)
        for prompt in range(prompt_count)
        for width, height in size_list
        for seed in seed_list
    ]


def job_request_id(content_key: str, job: ImageJob, options: dict[str, Any]) -> str:
    """The same job asks with the same id, so the generator can answer a resumed batch from its store."""
    described = json.dumps(
        {"prompt": content_key, "seed": job.seed, "size": [job.width, job.height], **options},
        sort_keys=True,
        default=str,
    )
    return "batch-" + hashlib.sha256(described.encode()).hexdigest()[:32]


MAX_SEEDS = 100_000


def parse_seeds(text: str) -> list[int]:
    """'0-7', '3', '0,5,9' or '0-3,10-12' -> seeds, in order, without repeats."""
    seeds: list[int] = []
    try:
        for part in filter(None, (piece.strip() for piece in text.split(","))):
            first, _, last = part.partition("-") if not part.startswith("-") else (part, "", "")
            low = int(first)
            high = int(last) if last else low
            if low < 0 or high < low or high > MAX_SEED:
                raise ValueError
            # Checked before the range is listed: '0-10**12' would otherwise fill the memory.
            if len(seeds) + high - low + 1 > MAX_SEEDS:
                raise InvalidArgument(
                    f"--seeds {text!r} asks for more than {MAX_SEEDS} seeds per prompt; split the batch "
                    "into several runs (each resumes in the same --out-dir)."
                )
            seeds.extend(range(low, high + 1))
    except ValueError:
        raise InvalidArgument(
            f"--seeds {text!r} is not a seed list; use e.g. '0-7', '42' or '0,5,9' (0 to 2**64-1)."
        ) from None
    if not seeds:
        raise InvalidArgument("--seeds is empty; use e.g. '0-7'.")
    return list(dict.fromkeys(seeds))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1024x1024,768x1344' -> [(width, height), ...]."""
    sizes: list[tuple[int, int]] = []
    for part in filter(None, (piece.strip().lower() for piece in text.split(","))):
        width, separator, height = part.partition("x")
        if not separator or not width.isdigit() or not height.isdigit():
            raise InvalidArgument(f"--sizes entry {part!r} is not WIDTHxHEIGHT, e.g. 1024x1024,768x1344.")
        sizes.append((int(width), int(height)))
    if not sizes:
        raise InvalidArgument("--sizes is empty; use e.g. 1024x1024,768x1344.")
    return sizes
