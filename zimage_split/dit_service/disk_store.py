"""The embedding store's disk tier: one content-addressed <key>.safetensors file per embedding, optionally
bounded in bytes (least recently used files go first)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from zimage_split.common.errors import PermissionDenied
from zimage_split.common.files import write_error
from zimage_split.common.wire import EMBEDDING_KEY_PREFIX, checksum, describe, dtype_name, payload_view

logger = logging.getLogger(__name__)

TENSOR_NAME = "embedding"
IDENTITY_FILE = "encoder-identity.json"
TEMP_PREFIX = ".partial-"
# A write takes milliseconds; a temp file older than this was left by a killed process. Younger ones may
# be another generator's write in progress, when several share one folder.
STALE_TEMP_SECONDS = 60.0
# Text keys ("text-" + sha256 of the prompt and encoder) and upload keys ("b3-" + BLAKE3). Anything else is
# never a file name, so a key sent by a client cannot point outside the folder. Upload keys from before
# BLAKE3 (bare sha256 hex) are not keys any more: their files are never looked up, and such a key misses.
_KEY_PATTERN = re.compile(rf"(text-|{re.escape(EMBEDDING_KEY_PREFIX)})[0-9a-f]{{64}}")
SUFFIX = ".safetensors"
_SHA256_UPLOAD_FILE = re.compile(r"[0-9a-f]{64}\.safetensors")
_COUNT_PATTERN = re.compile(r"[0-9]{1,9}")
_MODE_PATTERN = re.compile(r"[a-z_]{0,32}")


@dataclass(frozen=True)
class StoredEmbedding:
    """A stored tensor and how the encoder made it from its prompt (0 and "": not known, as for uploads)."""

    tensor: torch.Tensor
    # Tokens of the formatted prompt before shortening.
    source_token_count: int = 0
    # The long-prompt mode that shortened it, or "" when it was not shortened.
    shortened_by: str = ""


class CorruptFile(ValueError):
    """A stored file whose contents do not match its name or its own metadata."""


class DiskEmbeddingStore:
    """Keeps embeddings in `directory` across restarts. Blocking: call it from a thread, not the event loop.

    With `max_bytes`, the files stay under that many bytes in all: writing one removes the least recently
    used, never one this store is reading or writing. Recency is the file's mtime, which a read renews,
    so it carries over restarts; the order is this process's, so generators sharing the folder each keep
    to the limit what they know of it (the files there at their start, and those they write or read).
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(
                error,
                f"--embedding-store {self.directory}",
                "creating it",
                "Pick a folder this process can create and write.",
            ) from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionDenied(
                f"--embedding-store {self.directory}: this process cannot write to the folder. "
                "Fix its permissions or pick another folder."
            )
        # Guards the fields below: get and put run on several threads at once.
        self._lock = threading.Lock()
        # Sizes of the files by key, least recently used first.
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._bytes = 0
        # Keys being read or written now, which eviction skips.
        self._in_use: Counter[str] = Counter()
        self.evicted = 0
        self.cleanup()
        if max_bytes is not None:  # only a bounded store needs to know the files already there
            self._index()
            self._evict()  # a limit lower than last time's

    @property
    def used_bytes(self) -> int:
        """Bytes of the embedding files this store knows of (with no `max_bytes`, only those written or
        read by this process)."""
        return self._bytes

    def path_for(self, key: str) -> Path | None:
        """The file of `key`, or None for a string that is not an embedding key."""
        return self.directory / f"{key}{SUFFIX}" if _KEY_PATTERN.fullmatch(key) else None

    def cleanup(self, older_than_seconds: float = STALE_TEMP_SECONDS) -> int:
        """Removes temp files left by an interrupted write; returns how many it removed. Logs how many
        uploads an older version stored under sha256 keys, which are never read."""
        removed = unused = 0
        cutoff = time.time() - older_than_seconds
        for entry in os.scandir(self.directory):
            if _SHA256_UPLOAD_FILE.fullmatch(entry.name):
                unused += 1
                continue
            try:
                if entry.name.startswith(TEMP_PREFIX) and entry.stat().st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # another process removed or renamed it meanwhile
                continue
        if removed:
            logger.info("Removed %d unfinished embedding file(s) from %s.", removed, self.directory)
        if unused:
            logger.info(
                "%d file(s) in %s are uploaded embeddings stored by a version before BLAKE3 keys (named by "
                "sha256, 64 hex digits); they are never read, and clients upload again. Delete them to free "
                "the space.",
                unused,
                self.directory,
            )
        return removed

    def get(self, key: str) -> StoredEmbedding | None:
        """The stored embedding, or None if absent; a corrupt file is logged, removed and counts as absent."""
        path = self.path_for(key)
        if path is None or not path.is_file():
            return None
        with self._using(key):
            try:
                data = path.read_bytes()
                stored = _parse(data, key)
            except FileNotFoundError:  # evicted, or removed by another generator sharing the folder
                self._forget(key)
                return None
            except (CorruptFile, SafetensorError, OSError, KeyError, ValueError) as error:
                logger.warning(
                    "Embedding file %s is corrupt (%s); removing it, the key counts as a miss.", path, error
                )
                path.unlink(missing_ok=True)
                self._forget(key)
                return None
            with contextlib.suppress(OSError):  # recency that outlives the process; best effort
                os.utime(path)
            self._add(key, len(data))
        return stored

    def touch(self, key: str) -> None:
        """Marks `key` used now (the generator served it from memory), so eviction keeps it longer. No I/O."""
        with self._lock:
            if key in self._sizes:
                self._sizes.move_to_end(key)

    def put(
        self, key: str, tensor: torch.Tensor, *, source_token_count: int = 0, shortened_by: str = ""
    ) -> None:
        """Writes `tensor` under `key` (once: the same key always holds the same tensor), with how it was
        shortened, so a hit after a restart reports what the first encode did. Then removes the least
        recently used files while the store is over `max_bytes`."""
        path = self.path_for(key)
        if path is None:
            raise ValueError(f"{key!r} is not an embedding key; the store names files only by keys.")
        if path.is_file():  # content-addressed: the same key always holds the same tensor
            self.touch(key)
            return
        tensor = tensor.detach().to("cpu").contiguous()
        meta, _ = describe(tensor)
        metadata = {
            "key": key,
            "dtype": meta.dtype_name,
            "shape": json.dumps(list(meta.shape)),
            "blake3": meta.blake3,
            "source_token_count": str(source_token_count),
            "shortened_by": shortened_by,
        }
        data = save({TENSOR_NAME: tensor}, metadata=metadata)
        if self.max_bytes is not None and len(data) > self.max_bytes:
            logger.warning(
                "An embedding of %d bytes is larger than the whole --embedding-store-max-gb (%d bytes); "
                "it is kept in memory only.",
                len(data),
                self.max_bytes,
            )
            return
        with self._using(key):
            self._write_atomically(path, data)
            self._add(key, len(data))
            self._evict()

    @contextlib.contextmanager
    def _using(self, key: str) -> Iterator[None]:
        with self._lock:
            self._in_use[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_use[key] -= 1
                if not self._in_use[key]:
                    del self._in_use[key]

    def _add(self, key: str, size: int) -> None:
        with self._lock:
            self._bytes += size - self._sizes.get(key, 0)
            self._sizes[key] = size
            self._sizes.move_to_end(key)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._bytes -= self._sizes.pop(key, 0)

    def _index(self) -> None:
        """Learns the files already there, oldest mtime first."""
        found = []
        for entry in os.scandir(self.directory):
            key = entry.name.removesuffix(SUFFIX)
            if entry.name.endswith(SUFFIX) and _KEY_PATTERN.fullmatch(key):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    found.append((stat.st_mtime_ns, key, stat.st_size))
        for _, key, size in sorted(found):
            self._add(key, size)

    def _evict(self) -> None:
        """Removes least recently used files, skipping those in use, until the store fits in max_bytes.
        The files go while the lock is held, so a read either marked its key first or finds no file."""
        if self.max_bytes is None:
            return
        removed = 0
        with self._lock:
            for key in list(self._sizes):
                if self._bytes <= self.max_bytes:
                    break
                if self._in_use[key]:
                    continue
                self._bytes -= self._sizes.pop(key)
                try:
                    (self.directory / f"{key}{SUFFIX}").unlink(missing_ok=True)
                except OSError as error:  # it no longer counts; another generator may find it
                    logger.warning("Cannot remove %s%s from %s (%s).", key, SUFFIX, self.directory, error)
                removed += 1
            self.evicted += removed
        if removed:
            logger.debug(
                "Removed %d least recently used embedding file(s) from %s: %d of %d bytes used.",
                removed,
                self.directory,
                self._bytes,
                self.max_bytes,
            )

    def read_identity(self) -> str | None:
        """The last encoder identity written by write_identity, or None."""
        path = self.directory / IDENTITY_FILE
        try:
            identity = json.loads(path.read_text())["identity"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("Cannot read %s (%s); ignoring it.", path, error)
            return None
        return identity if isinstance(identity, str) else None

    def write_identity(self, identity: str, info: dict[str, Any]) -> None:
        """Records the encoder that text keys are made for, so they can be found while it is down."""
        record = {"identity": identity, **info}
        self._write_atomically(self.directory / IDENTITY_FILE, json.dumps(record, indent=2).encode())

    def _write_atomically(self, path: Path, data: bytes) -> None:
        temp = ""
        try:
            descriptor, temp = tempfile.mkstemp(dir=self.directory, prefix=TEMP_PREFIX)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        except OSError as error:
            raise write_error(
                error,
                path,
                "writing it",
                "Fix the --embedding-store folder or its disk, lower --embedding-store-max-gb, or pick "
                "another folder.",
            ) from None
        finally:
            if temp and os.path.exists(temp):  # only when the write or the rename failed
                os.unlink(temp)


def _parse(data: bytes, key: str) -> StoredEmbedding:
    # Read into memory rather than safe_open's memory map: a tensor kept in the LRU must not change, or
    # fault, if someone rewrites or truncates its file in place.
    tensor = load(data)[TENSOR_NAME]  # checks the layout: header, offsets and length
    # The safetensors layout: an 8-byte little-endian header length, then the JSON header.
    header_length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
    if metadata.get("key") != key:
        raise CorruptFile(f"it holds key {metadata.get('key')!r}")
    if dtype_name(tensor.dtype) is None:
        raise CorruptFile(f"it holds a {tensor.dtype} tensor")
    # Files written before BLAKE3 hold a sha256 and are still read, checked with it.
    algorithm = "blake3" if "blake3" in metadata else "sha256"
    found = {
        "dtype": dtype_name(tensor.dtype),
        "shape": json.dumps(list(tensor.shape)),
        algorithm: checksum(payload_view(tensor), algorithm),
    }
    for field, value in found.items():
        if metadata.get(field) != value:
            raise CorruptFile(f"its {field} is {value}, its metadata says {metadata.get(field)}")
    # Files written before long-prompt modes lack both: not known.
    source_token_count = str(metadata.get("source_token_count", "0"))
    shortened_by = str(metadata.get("shortened_by", ""))
    if not _COUNT_PATTERN.fullmatch(source_token_count) or not _MODE_PATTERN.fullmatch(shortened_by):
        raise CorruptFile(
            f"its source_token_count {source_token_count!r:.20} or shortened_by {shortened_by!r:.40}"
        )
    return StoredEmbedding(tensor, int(source_token_count), shortened_by)
