"""`zsplit encode` and `zsplit generate --embeddings`: encode each prompt once, then make every image.

A batch writes images under deterministic names with atomic renames, and records each one in a JSONL
manifest (parameters, timings, sha256). Re-running the same command skips images that are on disk and
match their manifest line, so a job killed at any moment resumes with every image made exactly once.
A folder that fills up or turns read-only stops the job with an error that says so; it resumes the same way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage_split.client.aio import AsyncClient
from zimage_split.client.batch import ImageJob, JobResult, plan_jobs
from zimage_split.client.embeddings import Embeddings, PromptEmbedding
from zimage_split.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ZSplitError,
)
from zimage_split.common.files import append_synced, locked_folder, write_atomically, write_error

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"
PROMPTS_PER_ENCODE_CALL = 32


def read_prompt_file(path: Path, warn: Callable[[str], None] = logger.warning) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (a string, or an object with "prompt", per line).

    Empty lines are skipped, with a warning naming them; invalid UTF-8 or JSON is an error naming the line.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"No prompt file at {path}.") from None
    except IsADirectoryError:
        raise InvalidArgument(f"{path} is a folder, not a prompt file; pass a .txt or .jsonl file.") from None
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    prompts: list[str] = []
    empty: list[int] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidArgument(
                f"{path}, line {number}: not valid UTF-8 (byte 0x{line[error.start]:02x} at column "
                f"{error.start + 1}). Save the file as UTF-8."
            ) from None
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not text.strip():
            empty.append(number)
            continue
        prompts.append(_jsonl_prompt(text, path, number) if is_jsonl else text)
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        warn(f"{path}: skipped {len(empty)} empty line(s) (line {shown}); every other line is one prompt.")
    if not prompts:
        raise InvalidArgument(f"{path} has no prompts; write one prompt per line.")
    return prompts


def _jsonl_prompt(text: str, path: Path, number: int) -> str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
    except (ValueError, RecursionError) as error:  # a number of over 4300 digits; arrays nested too deep
        raise InvalidArgument(
            f"{path}, line {number}: not a usable JSON value ({type(error).__name__}: {str(error)[:80]}); "
            'write a string, or an object with a "prompt" string.'
        ) from None
    if isinstance(value, dict):
        value = value.get("prompt")
    if not isinstance(value, str):
        raise InvalidArgument(
            f'{path}, line {number}: each JSONL line must be a string or an object with a "prompt" string.'
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # "\ud800": valid JSON, but no UTF-8 text can hold it
        raise InvalidArgument(
            f"{path}, line {number}: the prompt holds a lone surrogate escape ({value[error.start]!a}), which "
            "is not text; write the character itself, or both halves of its surrogate pair."
        ) from None
    return value


async def encode_prompts(
    client: AsyncClient,
    prompts: list[str],
    *,
    max_sequence_length: int | None = None,
    long_prompt_mode: str | None = None,
    on_encoded: Callable[[int], None] = lambda count: None,
) -> Embeddings:
    """Encodes in calls of PROMPTS_PER_ENCODE_CALL prompts; `on_encoded(n)` after each call."""
    items: list[PromptEmbedding] = []
    model_id = ""
    for start in range(0, len(prompts), PROMPTS_PER_ENCODE_CALL):
        part = await client.encode(
            prompts[start : start + PROMPTS_PER_ENCODE_CALL],
            max_sequence_length=max_sequence_length,
            long_prompt_mode=long_prompt_mode,
        )
        items.extend(part)
        model_id = part.model_id
        on_encoded(len(part))
    return Embeddings(items, model_id=model_id)


def png_bytes(image: Any, prompt: str) -> bytes:
    """The image as PNG with the text chunks a single image carries (`prompt`, `seed`, ..., `parameters`):
    the generator's own, which lack the prompt's text (it got an embedding), with the text put back; and
    what the SDK reported (`image.info`, timings included) as JSON in a `zimage-split` chunk."""
    from zimage_split.dit_service.outputs import OutputOptions, encode_image, read_metadata, with_prompt

    generated = image.info.get("file_bytes")
    settings = with_prompt(read_metadata(generated) if generated else {}, prompt)
    report = {key: value for key, value in image.info.items() if key != "file_bytes"}
    report |= {key: value for key, value in settings if key in ("prompt", "parameters")}
    chunks = (*settings, ("zimage-split", json.dumps(report, sort_keys=True)))
    return encode_image(image, OutputOptions(format="png", metadata=chunks))


@dataclass(frozen=True)
class SkipLayerGuidanceRequest:
    """A batch's Skip Layer Guidance as asked for (unset values take the generator's defaults)."""

    scale: float = 0.0
    layers: tuple[int, ...] = ()
    start: float | None = None
    stop: float | None = None

    def matches(self, recorded: dict[str, Any] | None) -> bool:
        """Whether an image made with `recorded` (ImageHeader.skip_layer_guidance as a dict) is one of these."""
        if not self.scale:
            return not recorded
        if not recorded:
            return False
        if self.layers and recorded.get("layers") != sorted(self.layers):
            return False
        # Values come back as float32 (0.05 as 0.0500000007): compare them rounded.
        numbers = {"scale": self.scale, "start": self.start, "stop": self.stop}
        return all(
            value is None or round(float(recorded.get(name, -1)), 5) == round(value, 5)
            for name, value in numbers.items()
        )

    def as_options(self) -> dict[str, Any]:
        return {
            "slg_scale": self.scale,
            "slg_layers": self.layers,
            "slg_start": self.start,
            "slg_stop": self.stop,
        }


@dataclass(frozen=True)
class DypeRequest:
    """A batch's DyPE as asked for (unset values take the generator's defaults)."""

    on: bool = False
    method: str | None = None
    scale: float | None = None
    exponent: float | None = None

    def matches(self, recorded: dict[str, Any] | None) -> bool:
        """Whether an image made with `recorded` (ImageHeader.dype as a dict) is one of these."""
        if not self.on:
            return not recorded
        if not recorded:
            return False
        if self.method is not None and recorded.get("method") != self.method:
            return False
        numbers = {"scale": self.scale, "exponent": self.exponent}
        return all(
            value is None or round(float(recorded.get(name, -1)), 5) == round(value, 5)
            for name, value in numbers.items()
        )

    def as_options(self) -> dict[str, Any]:
        return {
            "dype": self.on,
            "dype_method": self.method,
            "dype_scale": self.scale,
            "dype_exponent": self.exponent,
        }


@dataclass(frozen=True)
class BatchSettings:
    steps: int | None
    guidance_scale: float | None
    # LoRAs of every image, as (name, scale); images made with others are made again.
    loras: tuple[tuple[str, float], ...] = ()
    # The schedule shift; None is the model's own.
    shift: float | None = None
    slg: SkipLayerGuidanceRequest = SkipLayerGuidanceRequest()
    dype: DypeRequest = DypeRequest()

    def matches(self, entry: dict[str, Any]) -> bool:
        # Scales come back as float32 (0.7 as 0.699999988): compare them rounded.
        recorded = [
            (lora.get("name"), round(float(lora.get("scale", 0.0)), 5)) for lora in entry.get("loras") or []
        ]
        wanted = [(name, round(scale, 5)) for name, scale in self.loras]
        if self.shift is not None and round(float(entry.get("shift") or 0.0), 5) != round(self.shift, 5):
            return False
        if not self.slg.matches(entry.get("skip_layer_guidance")):
            return False
        if not self.dype.matches(entry.get("dype")):
            return False
        return recorded == wanted and all(
            value is None or entry.get(name) == value
            for name, value in (("steps", self.steps), ("guidance_scale", self.guidance_scale))
        )


class Manifest:
    """out_dir/manifest.jsonl: one line per finished image, appended and synced as each one lands."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.path = out_dir / MANIFEST_NAME
        self.entries: dict[str, dict[str, Any]] = {}

    def load_verified(self, embeddings: Embeddings, settings: BatchSettings) -> int:
        """Keeps the lines whose image is on disk with the recorded sha256 and the same inputs.

        Rewrites the manifest with just those (a line cut short by a kill is dropped), and removes
        temporary files a killed run left behind. Returns how many images are already done.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
        for line in lines:
            try:
                entry = json.loads(line)
                name = entry["file"]
                prompt = embeddings[int(entry["prompt_index"])]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
                continue  # a line cut short by a kill, or one from another job
            if entry.get("content_key") != prompt.content_key or not settings.matches(entry):
                continue
            image = self.out_dir / name
            if image.is_file() and hashlib.sha256(image.read_bytes()).hexdigest() == entry.get("sha256"):
                self.entries[name] = entry
        for leftover in self.out_dir.glob(".*.tmp"):  # after counting, so an error can say what is there
            leftover.unlink(missing_ok=True)
        write_atomically(
            self.path, "".join(json.dumps(entry) + "\n" for entry in self.entries.values()).encode()
        )
        return len(self.entries)

    def is_done(self, job: ImageJob) -> bool:
        return job.file_name in self.entries

    def record(self, result: JobResult, prompt: PromptEmbedding) -> dict[str, Any]:
        """Writes the image atomically, then appends and syncs its manifest line."""
        job = result.job
        info = result.image.info
        data = png_bytes(result.image, prompt.text)
        image = self.out_dir / job.file_name
        write_atomically(image, data)
        entry = {
            "file": job.file_name,
            "prompt_index": job.prompt_index,
            "prompt": prompt.text,
            "content_key": prompt.content_key,
            "seed": job.seed,
            "width": job.width,
            "height": job.height,
            "steps": info.get("steps"),
            "guidance_scale": info.get("guidance_scale"),
            "shift": info.get("shift"),
            "skip_layer_guidance": info.get("skip_layer_guidance"),
            "dype": info.get("dype"),
            "loras": info.get("loras") or [],
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "request_id": info.get("request_id"),
            "model_id": info.get("model_id"),
            "replica": info.get("replica"),
            "batch_size": info.get("batch_size"),
            "timings": info.get("timings"),
            "finished_at": time.time(),
        }
        try:
            append_synced(self.path, (json.dumps(entry) + "\n").encode())
        except OSError:
            # A resume would make the unrecorded image again anyway; removing it keeps the folder
            # equal to its manifest, and gives the space back.
            with contextlib.suppress(OSError):
                image.unlink()
            raise
        self.entries[job.file_name] = entry
        return entry


# What to do about a failed write to --out-dir, by errno; what happened is said in common.files' words
# (WRITE_PROBLEMS), with the same advice to run again.
_MOVE_IT = "or move the folder somewhere writable and point --out-dir there"
_MAKE_ROOM = "Free space on it, or move the folder to a disk with room and point --out-dir there"
_OUTPUT_FIXES = {
    errno.ENOSPC: _MAKE_ROOM,
    errno.EDQUOT: _MAKE_ROOM,
    errno.EROFS: f"Remount it read-write, {_MOVE_IT}",
    errno.EACCES: f"Give this user write access to it, {_MOVE_IT}",
    errno.EPERM: f"Give this user write access to it, {_MOVE_IT}",
}
_RUN_AGAIN = "then run the same command again: finished images are kept and skipped."


def _output_folder_error(error: OSError, out_dir: Path, doing: str, progress: str) -> ZSplitError:
    """The plain-words error, naming the folder, for a write to out_dir that failed: RESOURCE_EXHAUSTED for
    a full disk, PERMISSION_DENIED for a folder this user may not write, FAILED_PRECONDITION for the rest
    (read-only, not a folder, a failing disk): only the caller can fix those, so not UNAVAILABLE, which
    invites retrying the same call.
    """
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return FailedPrecondition(
            f"--out-dir {out_dir} is not a folder ({reason} while {doing}). {progress} Pass a folder's "
            "path (it is created if missing)."
        )
    fix = _OUTPUT_FIXES.get(error.errno or 0, "Fix the folder or its disk, or point --out-dir at another one")
    return write_error(error, f"The output folder {out_dir}", doing, f"{progress} {fix}; {_RUN_AGAIN}")


@contextlib.contextmanager
def explaining_output_errors(out_dir: Path, doing: str, progress: Callable[[], str]) -> Iterator[None]:
    """Turns an OSError from writing out_dir into the typed error above; `progress()` says what is saved."""
    try:
        yield
    except OSError as error:
        logger.info("Writing to %s failed while %s: %s", out_dir, doing, error)
        raise _output_folder_error(error, out_dir, doing, progress()) from error


def check_out_dir(out_dir: Path) -> None:
    """Creates out_dir and writes a probe file in it, so a folder the job cannot use (or another job is
    using) fails before any work."""
    with explaining_output_errors(out_dir, "creating it", lambda: "Nothing was generated."):
        out_dir.mkdir(parents=True, exist_ok=True)
    with (
        explaining_output_errors(out_dir, "creating a file in it", lambda: "Nothing was generated."),
        only_job_in(out_dir),
    ):
        descriptor, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=out_dir)
        os.close(descriptor)
        os.unlink(probe)


def only_job_in(out_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Holds out_dir for one job at a time: a second job there would sweep up the first one's temporary
    files and rewrite its manifest under it. The lock goes with the process, however it ends."""
    return locked_folder(
        out_dir,
        busy=lambda: FailedPrecondition(
            f"Another batch job is writing to --out-dir {out_dir}. Wait for it to end and run this command "
            "again (finished images are kept and skipped), or pick another folder."
        ),
    )


@dataclass(frozen=True)
class BatchReport:
    planned: int
    already_done: int
    made: int
    seconds: float
    dit_seconds: float  # sum of denoise + decode of the images made now


async def run_batch(
    client: AsyncClient,
    embeddings: Embeddings,
    out_dir: Path,
    *,
    seeds: list[int],
    sizes: list[tuple[int, int]],
    settings: BatchSettings,
    concurrency: int,
    on_image: Callable[[dict[str, Any]], None] = lambda entry: None,
    on_start: Callable[[int, int], None] = lambda planned, done: None,
) -> BatchReport:
    """Makes every image of embeddings x seeds x sizes that out_dir does not already hold."""
    check_out_dir(out_dir)
    with only_job_in(out_dir):  # held to the end: no other job sweeps our temporary files
        manifest = Manifest(out_dir)
        planned = plan_jobs(len(embeddings), seeds, sizes)
        with explaining_output_errors(
            out_dir,
            f"tidying {MANIFEST_NAME}",
            lambda: f"Nothing new was generated; {len(manifest.entries)} of {len(planned)} images are there.",
        ):
            manifest.load_verified(embeddings, settings)
        remaining = [job for job in planned if not manifest.is_done(job)]
        done = len(planned) - len(remaining)
        on_start(len(planned), done)
        started = time.perf_counter()
        dit_seconds = 0.0
        if remaining:
            results = client.generate_many(
                embeddings,
                seeds=seeds,
                jobs=remaining,
                concurrency=concurrency,
                steps=settings.steps,
                guidance_scale=settings.guidance_scale,
                shift=settings.shift,
                loras=settings.loras,
                **settings.slg.as_options(),
                **settings.dype.as_options(),
            )
            # aclosing: a failed write must cancel the requests in flight now, not when the generator is collected.
            async with contextlib.aclosing(results):
                async for result in results:
                    with explaining_output_errors(
                        out_dir,
                        f"saving {result.job.file_name}",
                        lambda: (
                            f"The job stopped with {len(manifest.entries)} of {len(planned)} images saved."
                        ),
                    ):
                        entry = manifest.record(result, embeddings[result.job.prompt_index])
                    timings = entry["timings"] or {}
                    dit_seconds += timings.get("denoise", 0.0) + timings.get("decode", 0.0)
                    on_image(entry)
        return BatchReport(len(planned), done, len(remaining), time.perf_counter() - started, dit_seconds)
