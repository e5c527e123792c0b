"""The generator's disk tier of embeddings: atomic content-addressed files, corruption read as a miss."""

import errno
import hashlib
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from zimage_split.common.errors import FailedPrecondition, PermissionDenied, ResourceExhausted
from zimage_split.common.wire import describe, payload_view
from zimage_split.dit_service.disk_store import TEMP_PREFIX, DiskEmbeddingStore

KEY = "text-" + "ab" * 32
UPLOAD_KEY = "b3-" + "cd" * 32


def temp_files(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_put_then_get_returns_the_same_tensor(tmp_path: Path, dtype: torch.dtype) -> None:
    store = DiskEmbeddingStore(tmp_path / "new" / "store")  # created, parents included
    tensor = torch.randn(7, 16).to(dtype)
    store.put(KEY, tensor)

    stored = store.get(KEY)
    assert stored is not None and stored.tensor.dtype == dtype
    assert torch.equal(stored.tensor, tensor)
    with safe_open(str(tmp_path / "new" / "store" / f"{KEY}.safetensors"), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["key"] == KEY and metadata["blake3"] == describe(tensor)[0].blake3
    assert "sha256" not in metadata
    assert metadata["shape"] == "[7, 16]"
    assert temp_files(store.directory) == []


def test_a_fresh_store_survives_reopening(tmp_path: Path) -> None:
    tensor = torch.randn(3, 16)
    DiskEmbeddingStore(tmp_path).put(UPLOAD_KEY, tensor)
    again = DiskEmbeddingStore(tmp_path).get(UPLOAD_KEY)
    assert again is not None and torch.equal(again.tensor, tensor)
    assert DiskEmbeddingStore(tmp_path).get("ef" * 32) is None


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: data[:-4] + bytes(b ^ 0xFF for b in data[-4:]), id="payload-flipped"),
        pytest.param(lambda data: data[:12] + b"\xff\xfe" + data[14:], id="header-flipped"),
    ],
)
def test_a_corrupt_file_is_a_logged_miss_and_is_removed(
    tmp_path: Path, damage, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    store = DiskEmbeddingStore(tmp_path)
    store.put(KEY, torch.randn(4, 16))
    path = tmp_path / f"{KEY}.safetensors"
    path.write_bytes(damage(path.read_bytes()))

    with caplog.at_level(logging.WARNING):
        assert store.get(KEY) is None
    assert "corrupt" in caplog.text and str(path) in caplog.text
    assert not path.exists()
    store.put(KEY, torch.ones(4, 16))  # the key can be stored again
    assert torch.equal(store.get(KEY).tensor, torch.ones(4, 16))  # type: ignore[union-attr]


def test_a_file_under_another_key_is_a_miss(tmp_path: Path) -> None:
    store = DiskEmbeddingStore(tmp_path)
    store.put(KEY, torch.randn(4, 16))
    os.rename(tmp_path / f"{KEY}.safetensors", tmp_path / f"{UPLOAD_KEY}.safetensors")
    assert store.get(UPLOAD_KEY) is None
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("key", ["../escape", "text-../../etc/passwd", "AB" * 32, "", "ab" * 31])
def test_strings_that_are_not_keys_never_become_paths(tmp_path: Path, key: str) -> None:
    store = DiskEmbeddingStore(tmp_path / "store")
    assert store.path_for(key) is None
    assert store.get(key) is None
    with pytest.raises(ValueError, match="not an embedding key"):
        store.put(key, torch.randn(2, 16))


def test_stale_temp_files_are_removed_at_startup_fresh_ones_kept(tmp_path: Path) -> None:
    stale, fresh = tmp_path / f"{TEMP_PREFIX}stale", tmp_path / f"{TEMP_PREFIX}fresh"
    stale.write_bytes(b"half a file")
    fresh.write_bytes(b"another generator is writing this")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))

    DiskEmbeddingStore(tmp_path)
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize(
    ("errno_", "error", "words"),
    [
        (errno.ENOSPC, ResourceExhausted, "is on a full disk (No space left on device while writing it)"),
        (
            errno.EIO,
            FailedPrecondition,
            "is on a disk that reported an I/O error: a failing disk, or a lost network mount (Input/output error while writing it)",
        ),
        (errno.EACCES, PermissionDenied, "is not writable by this user (Permission denied while writing it)"),
        (errno.EROFS, FailedPrecondition, "is on a read-only file system"),
    ],
)
def test_a_failed_write_is_a_typed_error_naming_the_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int, error: type, words: str
) -> None:
    """Fault injection: a real disk that fails mid-write (EIO) cannot be made in a test."""
    store = DiskEmbeddingStore(tmp_path)

    def failing(source: str, target: str) -> None:
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(error, match=re.escape(f"{tmp_path / KEY}.safetensors {words}")) as raised:
        store.put(KEY, torch.randn(4, 16))
    assert "--embedding-store" in raised.value.message
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_resource_exhausted(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        store = DiskEmbeddingStore(folder)
        with pytest.raises(ResourceExhausted, match=r"is on a full disk \(No space left on device"):
            store.put(KEY, torch.randn(256, 16))  # 16 KiB
        assert temp_files(folder) == []
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_folder_that_cannot_be_created_is_failed_precondition(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(
        FailedPrecondition, match=r"--embedding-store .*a-file/store is not a folder.*while creating it"
    ):
        DiskEmbeddingStore(blocker / "store")


def test_encoder_identity_round_trips_and_a_broken_one_is_ignored(tmp_path: Path) -> None:
    store = DiskEmbeddingStore(tmp_path)
    assert store.read_identity() is None
    store.write_identity("qwen|float32|-2|512", {"model_id": "qwen"})
    assert DiskEmbeddingStore(tmp_path).read_identity() == "qwen|float32|-2|512"
    (tmp_path / "encoder-identity.json").write_text("{not json")
    assert store.read_identity() is None
    assert temp_files(tmp_path) == []


def test_a_loaded_tensor_does_not_change_when_its_file_is_rewritten_in_place(tmp_path: Path) -> None:
    store = DiskEmbeddingStore(tmp_path)
    store.put(KEY, torch.zeros(4, 16))
    loaded = store.get(KEY)
    path = tmp_path / f"{KEY}.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-4] + torch.tensor([1.0]).numpy().tobytes())  # same inode, new last value
    assert torch.equal(loaded.tensor, torch.zeros(4, 16))  # type: ignore[union-attr]


def test_how_a_prompt_was_shortened_survives_reopening_and_old_files_still_load(tmp_path: Path) -> None:
    tensor = torch.randn(5, 16)
    DiskEmbeddingStore(tmp_path).put(KEY, tensor, source_token_count=300, shortened_by="pool")
    stored = DiskEmbeddingStore(tmp_path).get(KEY)
    assert stored is not None and (stored.source_token_count, stored.shortened_by) == (300, "pool")
    assert torch.equal(stored.tensor, tensor)

    # A file from before long-prompt modes: no such metadata, so not known.
    old = {"key": UPLOAD_KEY, "dtype": "float32", "shape": "[5, 16]", "blake3": describe(tensor)[0].blake3}
    (tmp_path / f"{UPLOAD_KEY}.safetensors").write_bytes(save({"embedding": tensor}, metadata=old))
    stored = DiskEmbeddingStore(tmp_path).get(UPLOAD_KEY)
    assert stored is not None and (stored.source_token_count, stored.shortened_by) == (0, "")
    assert torch.equal(stored.tensor, tensor)

    # Metadata that is not a count or a mode name is corruption: a miss, never a crash later on.
    bad = {**old, "key": KEY, "source_token_count": "many"}
    (tmp_path / f"{KEY}.safetensors").write_bytes(save({"embedding": tensor}, metadata=bad))
    assert DiskEmbeddingStore(tmp_path).get(KEY) is None


def sha256_era_file(tensor: torch.Tensor, key: str) -> bytes:
    """A file as a version before BLAKE3 wrote it: its checksum is sha256."""
    digest = hashlib.sha256(payload_view(tensor)).hexdigest()
    return save(
        {"embedding": tensor}, metadata={"key": key, "dtype": "float32", "shape": "[5, 16]", "sha256": digest}
    )


def test_a_text_entry_from_before_blake3_is_read_and_checked_with_sha256(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tensor = torch.randn(5, 16)
    (tmp_path / f"{KEY}.safetensors").write_bytes(sha256_era_file(tensor, KEY))
    stored = DiskEmbeddingStore(tmp_path).get(KEY)
    assert stored is not None and torch.equal(stored.tensor, tensor)

    data = bytearray(sha256_era_file(tensor, KEY))
    data[-1] ^= 0x01
    (tmp_path / f"{KEY}.safetensors").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert DiskEmbeddingStore(tmp_path).get(KEY) is None
    assert "is corrupt (its sha256 is" in caplog.text
    assert not (tmp_path / f"{KEY}.safetensors").exists()


def test_upload_entries_keyed_by_sha256_are_skipped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_key = "cd" * 32  # upload keys before BLAKE3: bare sha256 hex
    (tmp_path / f"{old_key}.safetensors").write_bytes(sha256_era_file(torch.randn(5, 16), old_key))
    with caplog.at_level(logging.INFO):
        store = DiskEmbeddingStore(tmp_path)
    assert "1 file(s) in" in caplog.text and "before BLAKE3 keys" in caplog.text
    assert store.path_for(old_key) is None
    assert store.get(old_key) is None  # a miss: the client uploads again and gets a "b3-" key
    assert (tmp_path / f"{old_key}.safetensors").exists()  # left for the operator, never read


# --- --embedding-store-max-gb ------------------------------------------------------------------------


def upload_key(index: int) -> str:
    return f"b3-{index:064x}"


def file_size(folder: Path, tensor: torch.Tensor) -> int:
    """Bytes of the file of `tensor` (an upload: no shortening metadata)."""
    probe = DiskEmbeddingStore(folder)
    probe.put(upload_key(0), tensor)
    return probe.used_bytes


def stored_keys(directory: Path) -> set[str]:
    return {
        name.removesuffix(".safetensors") for name in os.listdir(directory) if name.endswith(".safetensors")
    }


def test_a_size_limit_removes_the_least_recently_used_files(tmp_path: Path) -> None:
    tensor = torch.randn(8, 16)
    size = file_size(tmp_path.parent / f"{tmp_path.name}-probe", tensor)
    store = DiskEmbeddingStore(tmp_path, max_bytes=3 * size)
    for index in range(3):
        store.put(upload_key(index), tensor + index)
    assert stored_keys(tmp_path) == {upload_key(0), upload_key(1), upload_key(2)}

    assert store.get(upload_key(0)) is not None  # used: now 1 is the least recently used
    store.touch(upload_key(2))  # served from memory: used too
    store.put(upload_key(3), tensor + 3)
    assert stored_keys(tmp_path) == {upload_key(0), upload_key(2), upload_key(3)}
    assert store.used_bytes == 3 * size and store.evicted == 1
    assert store.get(upload_key(1)) is None  # a miss, as for a key never stored

    # What was used last survives a restart with a lower limit: recency is the files' mtime.
    os.utime(tmp_path / f"{upload_key(2)}.safetensors", (1, 1))  # long unused, on disk
    reopened = DiskEmbeddingStore(tmp_path, max_bytes=2 * size)
    assert stored_keys(tmp_path) == {upload_key(0), upload_key(3)}
    assert reopened.used_bytes == 2 * size
    # An embedding larger than the whole store stays in memory only; nothing is removed for it.
    reopened.put(KEY, torch.randn(64, 16))
    assert stored_keys(tmp_path) == {upload_key(0), upload_key(3)}


def test_a_file_being_read_is_never_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensor = torch.randn(8, 16)
    size = file_size(tmp_path.parent / f"{tmp_path.name}-probe", tensor)
    store = DiskEmbeddingStore(tmp_path, max_bytes=2 * size)
    store.put(upload_key(0), tensor)
    store.put(upload_key(1), tensor + 1)

    from zimage_split.dit_service import disk_store

    parse = disk_store._parse
    reading, release = threading.Event(), threading.Event()

    def slow_parse(data: bytes, key: str):  # type: ignore[no-untyped-def]
        if key == upload_key(0):
            reading.set()
            assert release.wait(timeout=30)
        return parse(data, key)

    monkeypatch.setattr(disk_store, "_parse", slow_parse)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(store.get(upload_key(0))))
    reader.start()
    assert reading.wait(timeout=30)
    # 0 is the least recently used, but it is being read: 1 goes instead, then 2 makes room for 3.
    store.put(upload_key(2), tensor + 2)
    assert stored_keys(tmp_path) == {upload_key(0), upload_key(2)}
    release.set()
    reader.join(timeout=30)
    assert got and got[0] is not None and torch.equal(got[0].tensor, tensor)  # type: ignore[attr-defined]
    store.put(upload_key(3), tensor + 3)  # the read of 0 ended after 2 was written: 2 goes, 0 stays
    assert stored_keys(tmp_path) == {upload_key(0), upload_key(3)}
