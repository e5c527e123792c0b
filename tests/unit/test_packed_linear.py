"""oneDNN-packed linear layers: the same products as nn.Linear, and only the packed weight's own pages
are handed back."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch

from zimage_split.encoder_service.packed_linear import PackedLinear, can_pack, pack_linear_layers

# Skips that stay: packing is a feature of the torch build (oneDNN) and of the CPU (for bf16), not of
# the install, and the encoder falls back to nn.Linear without it.
pytestmark = pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.float32), reason="no oneDNN in this torch"
)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_packed_linear_computes_what_nn_linear_does(dtype: torch.dtype, tolerance: float) -> None:
    if not can_pack(torch.device("cpu"), dtype):
        pytest.skip(f"this CPU cannot pack {dtype}")
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384, bias=True).to(dtype)
    x = torch.randn(1, 37, 256, dtype=dtype)
    with torch.inference_mode():
        want = linear(x)
        got = PackedLinear(linear)(x)
    assert got.shape == want.shape == (1, 37, 384)
    assert (got.float() - want.float()).abs().max().item() <= tolerance * want.float().abs().max().item()


def test_packing_a_model_replaces_every_linear_and_keeps_its_output() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32, bias=False)
    )
    x = torch.randn(5, 64)
    with torch.inference_mode():
        want = model(x)
        assert pack_linear_layers(model) == 2
        got = model(x)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert torch.allclose(got, want, atol=1e-5)


def test_only_the_packed_weights_pages_are_released() -> None:
    """Weights that share one storage (as tensors of a memory-mapped shard do): the packed one's whole pages
    are dropped (anonymous pages then read as zeros), its neighbour and a tied view keep their values."""
    page = mmap.PAGESIZE
    floats = page // 4
    backing = torch.randn(9 * floats)
    # Page-aligned, as a memory-mapped shard's tensors are at least within their pages.
    storage = backing[(-backing.data_ptr() % page) // 4 :][: 8 * floats]
    first, second = torch.nn.Linear(floats, 2, bias=False), torch.nn.Linear(floats, 2, bias=False)
    tied = torch.nn.Linear(floats, 1, bias=False)
    with torch.no_grad():
        first.weight = torch.nn.Parameter(storage[: 2 * floats].view(2, floats), requires_grad=False)
        second.weight = torch.nn.Parameter(
            storage[4 * floats : 6 * floats].view(2, floats), requires_grad=False
        )
        # Overlaps `second`: its pages must stay.
        tied.weight = torch.nn.Parameter(
            storage[5 * floats : 6 * floats].view(1, floats), requires_grad=False
        )
    alone, sharing = torch.nn.ModuleList([first]), torch.nn.ModuleList([second, tied])
    before = storage.clone()
    x = torch.randn(3, floats)
    with torch.inference_mode():
        want = [layer(x) for layer in [*alone, *sharing]]
        pack_linear_layers(alone)
        pack_linear_layers(sharing)
        got = [layer(x) for layer in [*alone, *sharing]]
    assert all(isinstance(layer, PackedLinear) for layer in [*alone, *sharing])
    for one, other in zip(got, want, strict=True):
        assert torch.allclose(one, other, atol=1e-4)
    # The first weight had no overlapping neighbour: its pages are gone. Everything else is untouched.
    assert storage.data_ptr() % page == 0
    assert torch.count_nonzero(storage[: 2 * floats]) == 0
    assert torch.equal(storage[2 * floats :], before[2 * floats :])


def test_each_original_weight_is_freed_before_the_next_is_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    """So packing never holds two copies of more than one weight."""
    import weakref

    from zimage_split.encoder_service import packed_linear

    model = torch.nn.Sequential(*(torch.nn.Linear(32, 32) for _ in range(4)))
    originals = [weakref.ref(layer.weight) for layer in model]
    alive_at_each_pack: list[int] = []
    real_init = packed_linear.PackedLinear.__init__

    def observing_init(self, linear):  # type: ignore[no-untyped-def]
        alive_at_each_pack.append(sum(ref() is not None for ref in originals))
        real_init(self, linear)

    monkeypatch.setattr(packed_linear.PackedLinear, "__init__", observing_init)
    assert pack_linear_layers(model) == 4
    assert alive_at_each_pack == [4, 3, 2, 1]
    assert all(ref() is None for ref in originals)


def _resident_kib(path: str) -> int:
    """Resident KiB of this process's mappings of `path`, from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as handle:
        for line in handle:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = fields[-1] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_memory_mapped_weight_leaves_memory_once_packed(tmp_path: Path) -> None:
    """As transformers' safetensors loading leaves weights: in a file mapping that outlives the tensor."""
    import numpy as np

    path = tmp_path / "weight.bin"
    rows, columns = 256, 1024  # 1 MiB of float32
    np.random.default_rng(0).standard_normal((rows, columns), dtype=np.float32).tofile(path)
    mapped = np.memmap(
        path, dtype=np.float32, mode="c", shape=(rows, columns)
    )  # private, as safetensors maps
    linear = torch.nn.Linear(columns, rows, bias=False)
    linear.weight = torch.nn.Parameter(torch.from_numpy(np.asarray(mapped)), requires_grad=False)
    parent = torch.nn.ModuleList([linear])
    x = torch.randn(2, columns)
    with torch.inference_mode():
        want = parent[0](x)
    del linear
    assert _resident_kib(str(path)) >= 900  # the forward pass read every page
    with torch.inference_mode():
        assert pack_linear_layers(parent) == 1
        got = parent[0](x)
    assert _resident_kib(str(path)) < 100, "the mapped pages should have been handed back"
    assert torch.allclose(got, want, atol=1e-4)
    del mapped
