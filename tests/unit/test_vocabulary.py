"""The shared words and their wire numbers: requests are checked, replies are read leniently."""

from __future__ import annotations

import pytest

from zimage_split._proto.generator.v1 import generator_pb2
from zimage_split.client.aio import image_metadata
from zimage_split.common.errors import InvalidArgument
from zimage_split.common.vocabulary import (
    ENCODER_LONG_PROMPT_MODE,
    GENERATOR_LONG_PROMPT_MODE,
    LONG_PROMPT_MODES,
    OUTPUT_FORMAT,
    OUTPUT_FORMATS,
)


@pytest.mark.parametrize("names", [ENCODER_LONG_PROMPT_MODE, GENERATOR_LONG_PROMPT_MODE, OUTPUT_FORMAT])
def test_every_name_round_trips_and_unset_is_unspecified(names) -> None:  # type: ignore[no-untyped-def]
    words = LONG_PROMPT_MODES if names is not OUTPUT_FORMAT else OUTPUT_FORMATS
    assert tuple(names.numbers) == words
    for word in words:
        assert names.name(names.number(word), "default") == word
        assert names.reported(names.number(word)) == word
    assert names.number(None) == names.number("") == names.unspecified == 0
    assert names.name(0, "default") == "default" and names.reported(0) == ""


def test_unknown_values_in_a_request_are_refused_with_the_choices() -> None:
    with pytest.raises(
        InvalidArgument, match="Unknown output_format 'gif'; use one of png, jpeg, webp, latent"
    ):
        OUTPUT_FORMAT.number("gif")
    with pytest.raises(
        InvalidArgument, match="Unknown long_prompt_mode 9; use TRUNCATE, INTERPOLATE or POOL"
    ):
        GENERATOR_LONG_PROMPT_MODE.name(9, "truncate")


def test_a_reply_with_a_mode_this_version_does_not_know_is_still_read() -> None:
    """A newer generator may report a long-prompt mode added after this client: the image still arrives."""
    assert GENERATOR_LONG_PROMPT_MODE.reported(99) == ""
    header = generator_pb2.ImageHeader(prompt_shortened_by=99)
    assert image_metadata(header)["prompt_shortened_by"] == ""
