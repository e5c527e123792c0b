"""num_images: several images of one prompt in one request, seeds seed..seed+n-1, within the limit."""

import numpy as np
import pytest
from PIL import Image

from zimage_split.cli import main
from zimage_split.common.errors import InvalidArgument


def test_images_of_one_request_equal_single_requests_with_consecutive_seeds(client) -> None:  # type: ignore[no-untyped-def]
    progress: list[tuple[int, int]] = []
    images = client.generate_images(
        "three of a kind",
        num_images=3,
        seed=10,
        width=64,
        height=64,
        steps=2,
        on_progress=lambda step, total: progress.append((step, total)),
    )
    assert [image.info["seed"] for image in images] == [10, 11, 12]
    assert [image.info["image_index"] for image in images] == [0, 1, 2]
    for image in images:
        alone = client.generate("three of a kind", seed=image.info["seed"], width=64, height=64, steps=2)
        assert np.array_equal(np.asarray(image), np.asarray(alone))
    assert [step for step, _ in progress] == sorted(step for step, _ in progress)
    assert progress[-1] == (6, 6)


def test_a_retried_request_id_returns_every_image_again(client) -> None:  # type: ignore[no-untyped-def]
    first = client.generate_images("again", num_images=2, width=64, height=64, steps=1, request_id="pair")
    steps: list[int] = []
    again = client.generate_images(
        "again",
        num_images=2,
        width=64,
        height=64,
        steps=1,
        request_id="pair",
        on_progress=lambda s, t: steps.append(s),
    )
    assert steps == [], "the retry ran the DiT again"
    assert [image.info for image in again] == [image.info for image in first]


def test_num_images_over_the_limit_or_past_the_last_seed_is_refused(client) -> None:  # type: ignore[no-untyped-def]
    assert int(client.generator_info()["max_images_per_request"]) == 4
    with pytest.raises(
        InvalidArgument, match="num_images must be between 1 and 4 .*--max-images-per-request"
    ):
        client.generate_images("too many", num_images=5, width=64, height=64, steps=1)
    with pytest.raises(InvalidArgument, match="num_images must be between 1 and 4"):
        client.generate_images("none", num_images=0, width=64, height=64, steps=1)
    with pytest.raises(InvalidArgument, match="runs past the largest seed"):
        client.generate_images("late", num_images=2, seed=2**64 - 1, width=64, height=64, steps=1)


def test_cli_writes_one_file_per_image(generator, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    output = tmp_path / "fox.png"
    code = main(
        [
            "generate",
            "a fox",
            "--generator",
            f"127.0.0.1:{generator.port}",
            "--num-images",
            "2",
            "--seed",
            "4",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "-o",
            str(output),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fox-0.png", "fox-1.png"]
    with Image.open(tmp_path / "fox-1.png") as image:
        assert image.text["seed"] == "5"
