"""iwae.files: the package's creates, appends and locks never follow a symbolic link at the name they open, a
derived folder that is a link is refused, a loop of links and an over-long name are one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iwae import files


@pytest.fixture
def precious(tmp_path: Path) -> Path:
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    return target


def test_append_creates_then_appends_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    files.append_text(path, "one\n")
    files.append_text(path, "two\n")
    assert path.read_text() == "one\ntwo\n"


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
@pytest.mark.parametrize("opener", [files.open_append, files.open_lock], ids=["append", "lock"])
def test_an_open_refuses_a_link_and_leaves_its_target_as_it_was(
    tmp_path: Path, precious: Path, dangling: bool, opener
) -> None:
    target = tmp_path / "missing.txt" if dangling else precious
    link = tmp_path / "name"
    link.symlink_to(target)
    with pytest.raises(files.LinkRefused) as refused:
        opener(link, "the run's metrics")
    message = str(refused.value)
    assert message == f"the run's metrics {link} is a symbolic link, which this package never writes through; " \
        "remove the link and rerun"  # fmt: skip
    assert "\n" not in message and precious.read_text() == "keep me\n" and not (tmp_path / "missing.txt").exists()


def test_a_derived_folder_is_made_once_and_refused_where_it_is_a_link(tmp_path: Path) -> None:
    made = files.make_folder(tmp_path / "a" / "b", "the report's figures folder")
    assert made.is_dir() and files.make_folder(made) == made  # an existing folder is kept
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(files.LinkRefused, match=r"the report's figures folder .*link is a symbolic link"):
        files.make_folder(tmp_path / "link", "the report's figures folder")
    with pytest.raises(files.LinkRefused):
        files.check_derived(tmp_path / "link")
    files.check_derived(tmp_path / "a")  # a real folder, or nothing at all, passes
    files.check_derived(tmp_path / "nothing")
    assert list(elsewhere.iterdir()) == []


def test_a_loop_of_links_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    expected = r"^--out .*loop is a loop of symbolic links; point it at a real folder$"
    with pytest.raises(files.LinkRefused, match=expected):
        files.resolved(loop, "--out")
    with pytest.raises(files.LinkRefused):
        files.resolved(loop / "below")
    assert files.resolved(tmp_path / "x" / ".." / "y") == tmp_path.resolve() / "y"


def test_names_longer_than_the_file_system_allows_are_refused_before_anything_is_made(tmp_path: Path) -> None:
    files.check_name_lengths(tmp_path / ("r" * files.NAME_MAX))
    with pytest.raises(ValueError, match=r"^--out .*: the name 'r{40}'\.\.\. is 256 bytes, longer than a file name"):
        files.check_name_lengths(tmp_path / ("r" * 256), "--out")
    with pytest.raises(ValueError, match="is 256 bytes"):  # bytes, not characters: 128 letters of two bytes each
        files.check_name_lengths("é" * 128 + "/x")
    with pytest.raises(ValueError, match=r"\(245 here\)"):  # what the package adds to the last name counts too
        files.check_name_lengths(tmp_path / ("r" * 250), extra=10)
    with pytest.raises(OSError):  # the limit is the file system's: what the check refuses, mkdir would too
        os.mkdir(tmp_path / ("r" * 256))


@pytest.mark.parametrize("opener", [files.open_append, files.open_lock], ids=["append", "lock"])
def test_a_file_with_other_hard_links_is_refused(tmp_path: Path, precious: Path, opener) -> None:
    os.link(precious, tmp_path / "metrics.jsonl")
    with pytest.raises(files.LinkRefused, match="has other hard links"):
        opener(tmp_path / "metrics.jsonl")
    assert precious.read_text() == "keep me\n"
