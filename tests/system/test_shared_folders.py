"""Services started together on a fresh machine: two encoders and two generators build the `tiny` preset
in one shared cache and share one --embedding-store, all at once, and all four serve."""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.processes import ServiceProcess
from zimage_split.client import Client
from zimage_split.dit_service.disk_store import TEMP_PREFIX


def test_four_services_started_at_once_on_a_fresh_cache_all_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZSPLIT_CACHE", raising=False)  # the preset goes where HOME and XDG say
    home, cache, store = tmp_path / "home", tmp_path / "cache", tmp_path / "embeddings"
    home.mkdir()
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(cache), "OMP_NUM_THREADS": "1"}
    preset = Path("tiny")
    encoders = [ServiceProcess("encoder", preset, env=env) for _ in range(2)]
    generators = [
        ServiceProcess(
            "generator",
            preset,
            "--encoder",
            encoder.address,
            "--embedding-store",
            str(store),
            "--embedding-store-max-gb",
            "1",
            env=env,
        )
        for encoder in encoders
    ]
    services = [*encoders, *generators]
    try:
        for service in services:  # all four started before any is waited on
            service.wait_serving(timeout=600)
        built = [path.name for path in (cache / "zimage-split").iterdir()]
        assert len(built) == 1 and built[0].startswith("tiny-"), f"one model, no staging folder: {built}"

        # Both generators store the same prompt into the one folder at the same moment.
        def generate(service: ServiceProcess) -> np.ndarray:
            with Client(generator=service.address, timeout=120) as client:
                return np.asarray(
                    client.generate("a shared lighthouse", seed=3, width=64, height=64, steps=2)
                )

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first, second = pool.map(generate, generators)
        assert np.array_equal(first, second)
        names = sorted(os.listdir(store))
        assert not [name for name in names if name.startswith(TEMP_PREFIX)], names
        assert names[0] == "encoder-identity.json" and len(names) == 2, names  # and the prompt's one file
        assert names[1].startswith("text-") and names[1].endswith(".safetensors"), names
    finally:
        for service in services:
            service.stop()
            os.unlink(service.log.name)
