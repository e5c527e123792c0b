"""The LoRAs loaded on one DiT replica: a least-recently-used cache of PEFT adapters, switched per request
without touching the base weights."""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zimage_split.common.errors import InvalidArgument, ResourceExhausted
from zimage_split.dit_service.lora.formats import DIFF, LORA_A, LORA_B, first_line, shown
from zimage_split.dit_service.lora.library import LoraLibrary, LoraSpec, check_specs, file_key

logger = logging.getLogger(__name__)


@dataclass
class _Adapter:
    name: str
    # The PEFT adapter's name, or None for a file that only holds norm and bias differences.
    adapter_name: str | None
    # (resolved path, size, mtime_ns, inode): a file replaced on disk gets a new key and is read again.
    key: tuple[str, int, int, int]
    deltas: dict[str, torch.Tensor]


class LoraAdapters:
    """The LoRAs loaded on one DiT: up to `capacity` cached as PEFT adapters (least recently used evicted),
    switched per request by `activate` without touching or copying the base weights.

    Thread-confined: call it only from the engine's worker thread, before each batch.
    """

    def __init__(self, pipe: Any, library: LoraLibrary, *, capacity: int = 8) -> None:
        if capacity < 1:
            raise InvalidArgument(f"The LoRA cache needs room for at least 1 adapter (got {capacity}).")
        self.pipe = pipe
        self.library = library
        self.capacity = capacity
        self._cache: OrderedDict[str, _Adapter] = OrderedDict()
        # What the transformer computes now: ((name, key, scale), ...); () is the base model, None unknown.
        self._state: tuple[tuple[str, tuple[str, int, int, int], float], ...] | None = ()
        # Parameters changed by `.diff` deltas: the parameter and its original value, restored exactly.
        self._originals: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        self._wrapped = False

    @property
    def loaded(self) -> list[str]:
        """Names of the cached LoRAs, least recently used first."""
        return [*self._cache]

    def activate(self, specs: Sequence[LoraSpec]) -> None:
        """Makes the transformer compute exactly the base model plus `specs` at their scales.

        `activate([])` gives the base model's exact output. LoRAs not cached yet are read and loaded
        (evicting the least recently used); a file changed on disk is read again. A failed load leaves no
        adapter behind, and the next call starts from a clean state.
        """
        specs = check_specs(specs)
        paths = [self.library.resolve(spec.name) for spec in specs]
        wanted = [(spec, path) for spec, path in zip(specs, paths, strict=True) if spec.scale != 0]
        if len(wanted) > self.capacity:
            raise InvalidArgument(
                f"The request uses {len(wanted)} LoRAs but this generator keeps at most {self.capacity} "
                "loaded; use fewer, or restart it with a larger LoRA cache."
            )
        keys = [file_key(path) for _, path in wanted]
        state = tuple((spec.name, key, spec.scale) for (spec, _), key in zip(wanted, keys, strict=True))
        for spec, _ in wanted:
            if spec.name in self._cache:
                self._cache.move_to_end(spec.name)
        if state == self._state:
            return
        with torch.inference_mode(False), torch.no_grad():
            self._restore_deltas()
            self._state = None
            transformer = self.pipe.transformer
            if not wanted:
                if self._wrapped:
                    transformer.disable_lora()
                self._state = ()
                return
            adapters = [
                self._cached(spec.name, path, key, {s.name for s, _ in wanted})
                for (spec, path), key in zip(wanted, keys, strict=True)
            ]
            scales = [spec.scale for spec, _ in wanted]
            names = [adapter.adapter_name for adapter in adapters if adapter.adapter_name]
            if names:
                transformer.enable_lora()
                weights = [
                    scale for adapter, scale in zip(adapters, scales, strict=True) if adapter.adapter_name
                ]
                transformer.set_adapters(names, weights)
            elif self._wrapped:
                transformer.disable_lora()
            self._apply_deltas(adapters, scales)
            self._state = state

    def close(self) -> None:
        """Deletes every cached adapter and restores the base weights."""
        with torch.inference_mode(False), torch.no_grad():
            self._restore_deltas()
            for name in [*self._cache]:
                self._drop(name)
            self._state = ()

    def _cached(self, name: str, path: Path, key: tuple[str, int, int, int], keep: set[str]) -> _Adapter:
        adapter = self._cache.get(name)
        if adapter is not None and adapter.key != key:
            logger.info("LoRA %s changed on disk; reading it again", name)
            self._drop(name)
            adapter = None
        if adapter is None:
            while len(self._cache) >= self.capacity:
                evicted = next(cached for cached in self._cache if cached not in keep)
                logger.info("Evicting LoRA %s (cache of %d)", evicted, self.capacity)
                self._drop(evicted)
            adapter = self._load(name, path, key)
            self._cache[name] = adapter
        self._cache.move_to_end(name)
        return adapter

    def _load(self, name: str, path: Path, key: tuple[str, int, int, int]) -> _Adapter:
        started = time.perf_counter()
        state_dict, info = self.library.read(name, path)
        transformer = self.pipe.transformer
        modules = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
        _check_against_model(name, transformer, modules)
        device, dtype = transformer.device, transformer.dtype
        lora = {
            f"transformer.{k}": v.to(device=device, dtype=dtype)
            for k, v in modules.items()
            if not k.endswith(DIFF)
        }
        deltas = {
            k.removesuffix(DIFF): v.to(device=device, dtype=torch.float32)
            for k, v in modules.items()
            if k.endswith(DIFF)
        }
        adapter_name = adapter_name_for(name) if lora else None
        if adapter_name is not None:
            # A leftover of the same name (another LoraAdapters on this pipe) would make PEFT refuse.
            self._delete_peft(adapter_name)
            self._wrapped = True
            try:
                with warnings.catch_warnings():
                    # PEFT warns on every adapter after the first; several adapters is the point here.
                    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                    transformer.load_lora_adapter(
                        lora, prefix="transformer", adapter_name=adapter_name, low_cpu_mem_usage=True
                    )
            except BaseException as error:
                self._delete_peft(adapter_name)
                if isinstance(error, torch.cuda.OutOfMemoryError):
                    raise ResourceExhausted(
                        f"Not enough device memory to load LoRA {shown(name)}; use fewer or smaller LoRAs, "
                        "or a smaller LoRA cache."
                    ) from error
                if isinstance(error, (ValueError, KeyError, TypeError, RuntimeError)):
                    raise InvalidArgument(
                        f"LoRA {shown(name)} could not be loaded into the DiT ({first_line(error)}); "
                        "check that it was trained for Z-Image-Turbo."
                    ) from error
                raise
        logger.info(
            "Loaded LoRA %s (%s, rank %d, %d modules) in %.2f s",
            name,
            info.format,
            info.rank,
            info.module_count,
            time.perf_counter() - started,
        )
        return _Adapter(name=name, adapter_name=adapter_name, key=key, deltas=deltas)

    def _drop(self, name: str) -> None:
        adapter = self._cache.pop(name)
        if adapter.adapter_name is not None:
            self._delete_peft(adapter.adapter_name)

    def _delete_peft(self, adapter_name: str) -> None:
        # delete_adapters clears the layers of every module, even when peft_config never got the name, and
        # does nothing where there are none.
        self.pipe.transformer.delete_adapters(adapter_name)

    def _apply_deltas(self, adapters: Sequence[_Adapter], scales: Sequence[float]) -> None:
        totals: dict[str, torch.Tensor] = {}
        for adapter, scale in zip(adapters, scales, strict=True):
            for name, delta in adapter.deltas.items():
                totals[name] = totals[name] + scale * delta if name in totals else scale * delta
        for name, total in totals.items():
            parameter = _parameter(self.pipe.transformer, name)
            if parameter is None:  # checked at load time; only a replaced transformer gets here
                raise InvalidArgument(f"The DiT has no parameter {name} for a LoRA difference.")
            original = parameter.detach().clone()
            self._originals[name] = (parameter, original)
            parameter.copy_((original.float() + total).to(parameter.dtype))

    def _restore_deltas(self) -> None:
        for parameter, original in self._originals.values():
            parameter.copy_(original)
        self._originals.clear()


def adapter_name_for(name: str) -> str:
    """The PEFT adapter name of a LoRA name: PEFT wants a plain identifier, names may hold `/` and `.`."""
    return "lora_" + hashlib.sha256(name.encode()).hexdigest()[:16]


def _module(transformer: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        module = transformer.get_submodule(path)
    except AttributeError:
        return None
    # A layer another adapter already wrapped: PEFT keeps the original as `base_layer`.
    return getattr(module, "base_layer", module)


def _parameter(transformer: torch.nn.Module, name: str) -> torch.nn.Parameter | None:
    path, _, leaf = name.rpartition(".")
    module = _module(transformer, path)
    parameter = getattr(module, leaf, None) if module is not None else None
    return parameter if isinstance(parameter, torch.nn.Parameter) else None


def _check_against_model(name: str, transformer: torch.nn.Module, modules: dict[str, torch.Tensor]) -> None:
    problems = []
    for key, value in modules.items():
        if key.endswith(DIFF):
            parameter = _parameter(transformer, key.removesuffix(DIFF))
            if parameter is None:
                problems.append(f"{key.removesuffix(DIFF)} is not in this DiT")
            elif parameter.shape != value.shape:
                problems.append(
                    f"{key.removesuffix(DIFF)} is {list(parameter.shape)}, the difference {list(value.shape)}"
                )
            continue
        module_name = key[: -len(LORA_A)]
        layer = _module(transformer, module_name)
        if layer is None:
            problems.append(f"{module_name} is not in this DiT")
        elif not isinstance(layer, torch.nn.Linear):
            problems.append(f"{module_name} is a {type(layer).__name__}, not a linear layer")
        elif key.endswith(LORA_A) and value.shape[1] != layer.in_features:
            problems.append(f"{module_name} takes {layer.in_features} inputs, its lora_A {value.shape[1]}")
        elif key.endswith(LORA_B) and value.shape[0] != layer.out_features:
            problems.append(f"{module_name} gives {layer.out_features} outputs, its lora_B {value.shape[0]}")
    if problems:
        unique = sorted(set(problems))
        raise InvalidArgument(
            f"LoRA {shown(name)} does not fit this DiT: {'; '.join(unique[:3])}"
            + (f" (and {len(unique) - 3} more)" if len(unique) > 3 else "")
            + ". It was made for another model or another Z-Image size; use one trained for this model."
        )
