"""Prompt files, seed and size lists, and the batch plan."""

from pathlib import Path

import pytest

from zimage_split.batch_jobs import read_prompt_file
from zimage_split.client.batch import ImageJob, parse_seeds, parse_sizes, plan_jobs
from zimage_split.common.errors import InvalidArgument


def test_text_prompt_files_skip_empty_lines_and_say_so(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red fox\r\n\n  \nsteaming ramen\n雪\n".encode())
    warnings: list[str] = []
    assert read_prompt_file(path, warn=warnings.append) == ["a red fox", "steaming ramen", "雪"]
    assert len(warnings) == 1 and "2 empty line(s) (line 2, 3)" in warnings[0]


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(InvalidArgument, match=r"line 2: not valid UTF-8 \(byte 0xff at column 5\)"):
        read_prompt_file(path)


def test_jsonl_takes_strings_or_prompt_objects(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('"plain"\n{"prompt": "object", "id": 3}\n\n')
    assert read_prompt_file(path, warn=lambda message: None) == ["plain", "object"]
    path.write_text('{"text": 1}\n')
    with pytest.raises(
        InvalidArgument, match='line 1: each JSONL line must be a string or an object with a "prompt"'
    ):
        read_prompt_file(path)


def test_a_file_of_blank_lines_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\n\n")
    with pytest.raises(InvalidArgument, match="no prompts"):
        read_prompt_file(path, warn=lambda message: None)


def test_seed_and_size_lists() -> None:
    assert parse_seeds("0-3,10,2") == [0, 1, 2, 3, 10]
    assert parse_sizes("1024x1024, 768X1344") == [(1024, 1024), (768, 1344)]
    for bad in ("3-1", "a", "-2", ""):
        with pytest.raises(InvalidArgument):
            parse_seeds(bad)
    with pytest.raises(InvalidArgument, match="WIDTHxHEIGHT"):
        parse_sizes("1024")


def test_plan_covers_every_prompt_size_and_seed_once() -> None:
    jobs = plan_jobs(2, [0, 1, 1], [(64, 64), (64, 96)])
    assert len(jobs) == 8 == len({job.file_name for job in jobs})
    assert jobs[0] == ImageJob(0, 0, 64, 64) and jobs[0].file_name == "p00000_s0_64x64.png"
