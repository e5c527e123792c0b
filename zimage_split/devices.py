"""Device and dtype choice shared by both services' command lines."""

from __future__ import annotations

import asyncio
import functools
import platform
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from zimage_split.common.errors import InvalidArgument
from zimage_split.common.vocabulary import DTYPES as DTYPE_NAMES

T = TypeVar("T")

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` means cuda, then mps, then cpu."""
    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError:
            raise InvalidArgument(
                f"Unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps."
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgument(
                f"--device {requested}: CUDA is not available on this host; use cpu or auto."
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise InvalidArgument(
                f"--device {requested}: MPS is not available on this host; use cpu or auto."
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# CPU feature flags (as Linux lists them in /proc/cpuinfo) that run bf16 matrix products natively. Without
# one, PyTorch converts bf16 to fp32 and back around every matmul: an encoder measured 2.9 tokens/s in bf16 on
# an EPYC without them, about a tenth of its fp32 speed, while a Xeon with AMX ran bf16 3.4x faster than fp32.
BF16_CPU_FEATURES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "bf16": "the Arm BF16 extension"}


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a service computes in, and why (the start-up log and Info say both)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@functools.cache
def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This CPU's feature flags as the kernel reports them (x86 `flags`, Arm `Features`); empty where the
    kernel does not say (macOS, Windows), which counts as no native bf16."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    return frozenset(
        flag
        for line in text.splitlines()
        if line.partition(":")[0].strip() in ("flags", "Features")
        for flag in line.partition(":")[2].split()
    )


def choose_dtype(name: str, device: torch.device, cpu_flags: Iterable[str] | None = None) -> DtypeChoice:
    """`auto`: bfloat16 on CUDA, on MPS, and on CPUs with native bf16 matrix instructions (AMX-BF16,
    AVX512-BF16, Arm BF16); float32 on other CPUs. `cpu_flags` defaults to this machine's."""
    if name != "auto":
        try:
            return DtypeChoice(DTYPES[name], f"--dtype {name}")
        except KeyError:
            raise InvalidArgument(f"Unknown dtype {name!r}; use auto, {', '.join(DTYPES)}.") from None
    if device.type in ("cuda", "mps"):
        return DtypeChoice(torch.bfloat16, f"auto: bf16 on {device.type.upper()}")
    flags = frozenset(cpu_features() if cpu_flags is None else cpu_flags)
    native = [label for flag, label in BF16_CPU_FEATURES.items() if flag in flags]
    if native:
        return DtypeChoice(
            torch.bfloat16, f"auto: this CPU has {' and '.join(native)}, so bf16 runs natively"
        )
    machine = platform.machine() or "this machine"
    return DtypeChoice(
        torch.float32,
        f"auto: this CPU ({machine}) lists no native bf16 matrix instructions (AMX-BF16, AVX512-BF16 or "
        "Arm BF16), so bf16 would be emulated and several times slower than fp32",
    )


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype `choose_dtype` picks, without its reason."""
    return choose_dtype(name, device).dtype


def synchronized_clock(device: torch.device) -> float:
    """time.perf_counter() once `device` has finished the work queued on it.

    CUDA kernels run asynchronously: without the synchronize, a clock read after a call measures the time to
    queue its kernels, and the next clock read also pays for them. A plain clock read on other devices.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def release_cached_memory(device: torch.device) -> None:
    """Gives the blocks torch's CUDA caching allocator holds back to the device (after an out-of-memory
    error, so the next request starts from a clean pool); nothing on other devices."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def torch_thread(name: str) -> ThreadPoolExecutor:
    """The one thread a service loads its model on, warms it up on and runs it on.

    PyTorch's CPU kernels run on OpenMP, which keeps one team of worker threads per calling thread: a
    model loaded on one thread and run on another leaves two teams contending for the same cores (the
    DiT ran 1.38x slower that way on 2 cores).
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


async def build_on_torch_thread(name: str, build: Callable[[], T]) -> tuple[ThreadPoolExecutor, T]:
    """A new `torch_thread` and what `build` (the model's load and warm-up) returned, run on it; the thread
    is shut down if `build` fails."""
    thread = torch_thread(name)
    try:
        return thread, await asyncio.get_running_loop().run_in_executor(thread, build)
    except BaseException:
        thread.shutdown(wait=False)
        raise
