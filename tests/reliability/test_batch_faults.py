"""Faults: a batch whose output folder fills up or turns read-only stops with a clear error, and resumes.

The folders are real tmpfs mounts (root only; skipped otherwise, failed under ZSPLIT_REQUIRE_ROOT=1, as in
CI), filled or remounted read-only while the job runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REQUIRE_ROOT, skip_or_fail
from tests.reliability.processes import ZSPLIT
from zimage_split.batch_jobs import MANIFEST_NAME, BatchSettings, Manifest, check_out_dir, run_batch
from zimage_split.client import AsyncClient, Client, Embeddings
from zimage_split.client.batch import ImageJob, JobResult
from zimage_split.common.errors import FailedPrecondition, ResourceExhausted
from zimage_split.common.files import append_synced

PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "ramen", "a neon city in the rain"]
SEEDS = list(range(6))  # 4 prompts x 6 seeds x one size = 24 images of about 10.7 kB (3 tmpfs pages)
PLANNED = len(PROMPTS) * len(SEEDS)
SETTINGS = BatchSettings(steps=2, guidance_scale=None)
# 12 pages: the first few images and their manifest lines fit, then the disk is full.
SMALL = "48k"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "ZSPLIT_LOG_LEVEL": "INFO"}  # INFO: the failed write's time


class Tmpfs:
    """A tmpfs mounted on `path`; `remount("ro")`, `remount("size=2m")`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)


def mount_tmpfs(path: Path, size: str) -> Iterator[Tmpfs]:
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs as the output folder needs root", REQUIRE_ROOT)
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here: {mounted.stderr.strip()}", REQUIRE_ROOT)
    try:
        yield Tmpfs(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    yield from mount_tmpfs(tmp_path / "small", SMALL)


@pytest.fixture
def roomy_tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    yield from mount_tmpfs(tmp_path / "roomy", "2m")


@pytest.fixture
def two_page_tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    yield from mount_tmpfs(tmp_path / "tiny", "8k")


@pytest.fixture(scope="module")
def embeddings_file(tmp_path_factory: pytest.TempPathFactory, encoder_fp32) -> Path:  # type: ignore[no-untyped-def]
    with Client(generator=None, encoder=f"127.0.0.1:{encoder_fp32.port}") as client:
        return client.encode(PROMPTS).save(tmp_path_factory.mktemp("faults") / "embeds.safetensors")


def batch_command(embeddings: Path, out_dir: Path) -> list[str]:
    """The CLI in local mode: a generator in the command itself, no encoder."""
    return [
        *ZSPLIT, "generate", "--embeddings", str(embeddings), "--seeds", f"0-{SEEDS[-1]}", "--sizes", "64x64",
        "--steps", "2", "--out-dir", str(out_dir), "--concurrency", "2", "--device", "cpu", "--no-progress",
    ]  # fmt: skip


def run_cli(command: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Runs it; returns the result and the wall time at which the process had exited."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=ENV)
    return result, time.time()


def failed_write_time(stderr: str) -> float:
    """When the batch logged its failed write (the log's local time, to the millisecond)."""
    match = re.search(r"^(\S+ \S+),(\d{3}) INFO zimage_split\.batch_jobs: Writing to", stderr, re.M)
    assert match, stderr
    return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(match[2]) / 1000


def folder_state(out_dir: Path) -> dict[str, dict]:
    """The manifest's entries by file, after checking the folder holds exactly them: every line whole,
    every image once and matching its sha256, no temporary or unrecorded files."""
    lines = (out_dir / MANIFEST_NAME).read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # a cut-short line would fail here
    by_file = {entry["file"]: entry for entry in entries}
    assert len(by_file) == len(entries), "an image recorded twice"
    assert sorted(path.name for path in out_dir.iterdir()) == sorted([*by_file, MANIFEST_NAME]), (
        "no temporary, partial or unrecorded files"
    )
    for name, entry in by_file.items():
        assert hashlib.sha256((out_dir / name).read_bytes()).hexdigest() == entry["sha256"], name
    return by_file


def batch_in_process(
    generator_port: int,
    embeddings_path: Path,
    out_dir: Path,
    on_image: Callable[[dict], None] = lambda entry: None,
):  # type: ignore[no-untyped-def]
    async def run():  # type: ignore[no-untyped-def]
        async with AsyncClient(generator=f"127.0.0.1:{generator_port}", timeout=60) as client:
            return await run_batch(
                client,
                Embeddings.load(embeddings_path),
                out_dir,
                seeds=SEEDS,
                sizes=[(64, 64)],
                settings=SETTINGS,
                concurrency=2,
                on_image=on_image,
            )

    return asyncio.run(run())


def test_a_full_disk_stops_the_batch_with_a_clear_error_and_the_same_command_resumes(
    small_tmpfs: Tmpfs, embeddings_file: Path, generator, figures
) -> None:  # type: ignore[no-untyped-def]
    out_dir = small_tmpfs.path / "out"
    command = batch_command(embeddings_file, out_dir)
    started = time.time()
    failed, exited = run_cli(command)
    failed_seconds = exited - started

    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    message = re.search(r"^zsplit: error \(RESOURCE_EXHAUSTED\): (.*)$", failed.stderr, re.M)
    assert message, failed.stderr
    assert message[1].startswith(
        f"The output folder {out_dir} is on a full disk (No space left on device while saving p"
    )
    saved_match = re.search(rf"The job stopped with (\d+) of {PLANNED} images saved\.", message[1])
    assert saved_match, message[1]
    assert message[1].endswith(
        "Free space on it, or move the folder to a disk with room and point --out-dir there; then run the "
        "same command again: finished images are kept and skipped."
    )
    saved = int(saved_match[1])
    before = folder_state(out_dir)
    assert len(before) == saved and 1 <= saved < PLANNED, "the disk filled partway through the job"
    assert os.statvfs(out_dir).f_bavail * os.statvfs(out_dir).f_frsize < 12 * 1024, "really full"
    to_exit = exited - failed_write_time(failed.stderr)
    assert failed.stderr.count("INFO zimage_split.batch_jobs: Writing to") == 1
    assert to_exit < 30, "the job stopped instead of making images it cannot save"

    # Running again without freeing space fails the same way and loses nothing.
    with pytest.raises(
        ResourceExhausted, match=rf"is on a full disk .* with {saved} of {PLANNED} images saved"
    ):
        batch_in_process(generator.port, embeddings_file, out_dir)
    assert folder_state(out_dir) == before

    small_tmpfs.remount("size=2m")
    started = time.time()
    resumed, exited = run_cli(command)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{PLANNED} images in {out_dir} ({saved} already there, {PLANNED - saved} made" in resumed.stdout
    after = folder_state(out_dir)
    assert len(after) == PLANNED
    assert {name: after[name] for name in before} == before, "images saved before the error were kept"

    figures.record(
        "Faults",
        "disk full during a batch: images saved before the error / after resume",
        f"{saved} / {PLANNED}",
    )
    figures.record(
        "Faults",
        "disk full: failed write to CLI exit",
        round(to_exit, 3),
        "s",
        "cancelling in-flight requests, stopping the local generator, interpreter exit (as long as after a "
        "successful run)",
    )
    figures.record("Faults", "disk full: failed CLI run, start to exit", round(failed_seconds, 1), "s")
    figures.record("Faults", "disk full: resumed CLI run, start to exit", round(exited - started, 1), "s")


def test_a_folder_that_turns_read_only_stops_the_batch_and_a_rerun_resumes(
    roomy_tmpfs: Tmpfs,
    embeddings_file: Path,
    generator,
    figures,
    caplog: pytest.LogCaptureFixture,
) -> None:  # type: ignore[no-untyped-def]
    out_dir = roomy_tmpfs.path / "out"
    caplog.set_level(logging.INFO, logger="zimage_split.batch_jobs")
    saved_before_remount = 3

    def remount_read_only_after_three(entry: dict) -> None:
        if len(folder_state(out_dir)) == saved_before_remount:
            roomy_tmpfs.remount("ro")

    with pytest.raises(FailedPrecondition) as stopped:
        batch_in_process(generator.port, embeddings_file, out_dir, on_image=remount_read_only_after_three)
    raised_at = time.time()
    assert str(stopped.value).startswith(
        f"The output folder {out_dir} is on a read-only file system (Read-only file system while saving p"
    )
    assert f"The job stopped with {saved_before_remount} of {PLANNED} images saved." in str(stopped.value)
    assert "then run the same command again: finished images are kept and skipped." in str(stopped.value)
    failed_writes = [record for record in caplog.records if record.msg.startswith("Writing to")]
    assert len(failed_writes) == 1 and raised_at - failed_writes[0].created < 10, "stopped at once"
    before = folder_state(out_dir)
    assert len(before) == saved_before_remount

    # The same command on the read-only folder fails before any model is loaded, and says so.
    started = time.time()
    refused, exited = run_cli(batch_command(embeddings_file, out_dir))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert (
        f"zsplit: error (FAILED_PRECONDITION): The output folder {out_dir} is on a read-only file system "
        "(Read-only file system while creating a file in it). Nothing was generated. Remount it read-write"
        in refused.stderr
    )
    assert "Generator" not in refused.stderr, "no generator was started"
    with pytest.raises(FailedPrecondition, match="is on a read-only file system .*while creating it"):
        check_out_dir(out_dir / "new")
    assert folder_state(out_dir) == before

    roomy_tmpfs.remount("rw")
    report = batch_in_process(generator.port, embeddings_file, out_dir)
    assert (report.already_done, report.made) == (saved_before_remount, PLANNED - saved_before_remount)
    after = folder_state(out_dir)
    assert len(after) == PLANNED and {name: after[name] for name in before} == before

    figures.record(
        "Faults",
        "read-only mid-batch: failed write to error raised",
        round(raised_at - failed_writes[0].created, 3),
        "s",
        "in-flight requests cancelled and awaited",
    )
    figures.record(
        "Faults", "read-only --out-dir: CLI refusal, start to exit", round(exited - started, 1), "s"
    )


def test_a_manifest_line_that_does_not_fit_leaves_no_trace(two_page_tmpfs: Tmpfs) -> None:
    """The image fits but its manifest line does not: the image goes too, and the manifest is unchanged."""
    import torch

    from zimage_split.client import PromptEmbedding

    manifest = Manifest(two_page_tmpfs.path)
    full_page = json.dumps({"pad": "x" * 4084}) + "\n"
    assert len(full_page) == 4096
    manifest.path.write_text(full_page)  # one page; the image takes the other
    image = Image.new("RGB", (32, 32), "red")
    image.info.update(steps=2, timings={})
    job = ImageJob(prompt_index=0, seed=0, width=32, height=32)
    prompt = PromptEmbedding("a red square", "key", torch.zeros(4, 16), 4, False)
    with pytest.raises(OSError, match="No space left"):
        manifest.record(JobResult(job, image), prompt)
    assert sorted(path.name for path in two_page_tmpfs.path.iterdir()) == [MANIFEST_NAME]
    assert manifest.path.read_text() == full_page and not manifest.entries

    # A line the disk cuts short mid-write (tmpfs takes what fits, then says ENOSPC) is cut back out.
    manifest.path.write_text("x" * 4000)
    with pytest.raises(OSError, match="No space left"):
        append_synced(manifest.path, b"y" * 8192)
    assert manifest.path.read_text() == "x" * 4000


def test_a_second_job_on_the_same_folder_is_refused_while_the_first_runs(
    tmp_path: Path, embeddings_file: Path, generator
) -> None:  # type: ignore[no-untyped-def]
    """Two jobs in one folder would sweep each other's temporary files: the second, a CLI run in another
    process, is refused before it loads a model, and says why."""
    out_dir = tmp_path / "out"
    refusals: list[subprocess.CompletedProcess[str]] = []

    def start_a_second_job(entry: dict) -> None:
        if not refusals:
            refusals.append(run_cli(batch_command(embeddings_file, out_dir))[0])

    report = batch_in_process(generator.port, embeddings_file, out_dir, on_image=start_a_second_job)
    assert refusals[0].returncode == 2 and "Traceback" not in refusals[0].stderr, refusals[0].stderr
    assert (
        f"zsplit: error (FAILED_PRECONDITION): Another batch job is writing to --out-dir {out_dir}. Wait for it "
        "to end and run this command again (finished images are kept and skipped), or pick another folder."
    ) in refusals[0].stderr
    assert "Generator" not in refusals[0].stderr, "no generator was started"
    assert report.made == PLANNED and len(folder_state(out_dir)) == PLANNED
    assert batch_in_process(generator.port, embeddings_file, out_dir).made == 0  # the lock went with the job


def test_a_single_image_that_does_not_fit_is_a_clear_error_naming_the_file(
    two_page_tmpfs: Tmpfs, generator
) -> None:  # type: ignore[no-untyped-def]
    """`zsplit generate -o` on a full disk: the image was made, the write fails, the error names the file."""
    (two_page_tmpfs.path / "filler").write_bytes(b"x" * 8192)
    output = two_page_tmpfs.path / "fox.png"
    command = [
        *ZSPLIT,
        "generate",
        "a red fox",
        "--generator",
        f"127.0.0.1:{generator.port}",
        "-o",
        str(output),
    ]
    failed, _ = run_cli([*command, "--width", "64", "--height", "64", "--steps", "2", "--no-progress"])
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert (
        f"zsplit: error (RESOURCE_EXHAUSTED): --output {output} is on a full disk (No space left on device "
        "while writing it). Free space or fix the folder, or pick another path." in failed.stderr
    )
    assert sorted(path.name for path in two_page_tmpfs.path.iterdir()) == ["filler"], "no temporary file"
