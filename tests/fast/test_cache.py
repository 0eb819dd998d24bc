"""The private build cache of the native code (iwae.fast.cache): who may own it, and what is loaded from it.

Builds here are fake (a Python one-liner writes the "library"; loading reads its bytes), except one real build of
the C kernels into the default cache, reused when it is already there."""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from iwae.fast import cache, native

FAKE_COMPILER = "IWAE_TEST_FAKE_CC"
WRITE_LIBRARY = "import sys; open(sys.argv[-1], 'wb').write(b'library v' + sys.argv[1].encode())"


class FakeBuild:
    """``native.build_and_load`` with a fake compiler (Python writes the bytes) and a fake loader (reads them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        monkeypatch.setenv(FAKE_COMPILER, sys.executable)  # `python --version` answers the compiler's query
        self.builds = 0

    def _command(self, compiler: str, flags: tuple[str, ...]) -> tuple[list[str], tuple[str, ...]]:
        self.builds += 1
        return [compiler, "-c", WRITE_LIBRARY, str(self.builds)], ()

    def __call__(self) -> tuple[bytes | None, str]:
        return native.build_and_load(
            "fake", "C", FAKE_COMPILER, (native.SOURCE,), (("-flag",),), self._command, lambda path: path.read_bytes()
        )

    @staticmethod
    def library() -> Path:
        (library,) = native.build_dir().glob("fake-*.so")
        return library


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_fresh_cache_is_private_and_records_the_sha256(monkeypatch, tmp_path, capsys) -> None:
    build = FakeBuild(monkeypatch, tmp_path)
    loaded, detail = build()
    assert loaded == b"library v1" and build.builds == 1
    library = build.library()
    assert detail == str(library)
    for directory in (tmp_path / "xdg", tmp_path / "xdg" / "iwae", native.build_dir()):  # every parent it made
        assert mode(directory) == 0o700
    assert mode(library) == 0o700
    record = cache.digest_path(library)
    assert record.name == library.name + ".sha256"
    assert record.read_text() == f"{cache.file_sha256(library)}  {library.name}\n"  # sha256sum's format
    assert sorted(native.build_dir().iterdir()) == [library, record]  # no temporary files left behind
    assert cache.library_problem(library) is None
    assert build() == (b"library v1", str(library)) and build.builds == 1  # the cached build, loaded as it is
    assert capsys.readouterr().err == ""


def test_a_tampered_library_is_rebuilt_not_loaded(monkeypatch, tmp_path, capsys) -> None:
    build = FakeBuild(monkeypatch, tmp_path)
    build()
    library = build.library()
    library.write_bytes(b"library from someone else")  # the bytes change after the record
    assert "SHA-256 differs from the one recorded" in cache.library_problem(library)
    loaded, detail = build()
    assert loaded == b"library v2" and build.builds == 2
    assert detail.startswith(f"{library}, rebuilt because") and "SHA-256 differs" in detail
    assert capsys.readouterr().err.count("warning: iwae rebuilds") == 1
    assert cache.library_problem(library) is None


def test_a_library_without_a_record_is_rebuilt_quietly(monkeypatch, tmp_path, capsys) -> None:
    """A build from before the records: rebuilt (its bytes cannot be vouched for), without a warning."""
    build = FakeBuild(monkeypatch, tmp_path)
    build()
    cache.digest_path(build.library()).unlink()
    assert "no recorded SHA-256" in cache.library_problem(build.library())
    loaded, _ = build()
    assert loaded == b"library v2" and capsys.readouterr().err == ""


def test_a_symlinked_library_or_record_is_refused(monkeypatch, tmp_path) -> None:
    build = FakeBuild(monkeypatch, tmp_path)
    build()
    library = build.library()
    elsewhere = tmp_path / "elsewhere.so"
    shutil.copy2(library, elsewhere)
    library.unlink()
    library.symlink_to(elsewhere)  # the same bytes, the recorded SHA-256 matches: still a link
    assert cache.library_problem(library) == f"{library.name} is a symbolic link"
    loaded, detail = build()
    assert loaded == b"library v2" and "is a symbolic link" in detail
    assert not library.is_symlink() and elsewhere.read_bytes() == b"library v1"  # the link went, not its target
    record = cache.digest_path(library)
    shutil.copy2(record, tmp_path / "record")
    record.unlink()
    record.symlink_to(tmp_path / "record")
    assert cache.library_problem(library) == f"{library.name}'s SHA-256 record {record.name} is a symbolic link"


def test_a_library_writable_by_others_or_owned_by_another_user_is_refused(monkeypatch, tmp_path) -> None:
    build = FakeBuild(monkeypatch, tmp_path)
    build()
    library = build.library()
    library.chmod(0o722)
    assert "writable by its group or others (mode 0o722)" in cache.library_problem(library)
    library.chmod(0o700)
    assert cache.library_problem(library) is None
    monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 4242)
    assert f"owned by uid {os.geteuid()}, not by this user" in cache.library_problem(library)


@pytest.mark.parametrize("directory_mode", [0o770, 0o707, 0o777])
def test_a_cache_writable_by_others_is_refused(directory_mode: int, monkeypatch, tmp_path, capsys) -> None:
    """Nothing is read from or written to it: the build goes to a private temporary directory, deleted after the
    load, with one warning line and the reason in the status."""
    build = FakeBuild(monkeypatch, tmp_path)
    directory = native.build_dir()
    directory.mkdir(parents=True)
    directory.chmod(directory_mode)
    assert cache.directory_problem(directory) == f"writable by its group or others (mode {directory_mode:#o})"
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where mkdtemp makes the private one
    loaded, detail = build()
    assert loaded == b"library v1"
    assert f"the build cache {directory} is refused: it is writable by its group or others" in detail
    assert detail.endswith("built in a private temporary directory")
    assert list(directory.iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []  # the temporary one is gone
    assert build()[0] == b"library v2"  # every process builds anew, and says why
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"warning: the build cache {directory} is refused")
    assert "chmod 700" in errors[0]


def test_a_symlinked_cache_is_refused(monkeypatch, tmp_path) -> None:
    build = FakeBuild(monkeypatch, tmp_path)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    native.build_dir().parent.mkdir(parents=True)
    native.build_dir().symlink_to(private)
    assert cache.directory_problem(native.build_dir()) == "a symbolic link"
    assert cache.make_private_directory(native.build_dir()) == "a symbolic link"
    loaded, detail = build()
    assert loaded == b"library v1" and "is refused: it is a symbolic link" in detail
    assert list(private.iterdir()) == []


def test_a_cache_owned_by_another_user_is_refused_and_so_is_what_it_builds(monkeypatch, tmp_path) -> None:
    """With ``os.getuid`` saying another user: the cache is refused, and the private temporary build (owned by the
    real user) fails the check too, so nothing is loaded and the status says why."""
    build = FakeBuild(monkeypatch, tmp_path)
    assert cache.make_private_directory(native.build_dir()) is None
    other = os.geteuid() + 4242
    monkeypatch.setattr(os, "getuid", lambda: other)
    expected = f"owned by uid {os.geteuid()}, not by this user (uid {other})"
    assert cache.directory_problem(native.build_dir()) == expected
    loaded, detail = build()
    assert loaded is None and build.builds == 1
    assert detail.startswith("fake was built but is not loaded: fake-") and expected in detail
    assert f"the build cache {native.build_dir()} is refused: it is {expected}" in detail


def test_a_cache_path_that_is_a_file_is_refused(monkeypatch, tmp_path) -> None:
    build = FakeBuild(monkeypatch, tmp_path)
    native.build_dir().parent.mkdir(parents=True)
    native.build_dir().write_text("not a directory")
    loaded, detail = build()
    assert loaded == b"library v1" and "is refused: it is not a directory" in detail


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
@pytest.mark.skipif(native.switched_off(), reason="the C kernels are switched off")
def test_the_kernels_load_from_the_default_cache_with_their_record() -> None:
    """The real path (one build at most: the default cache's, reused when present)."""
    assert native.available(), native.status()
    description = native._library().description
    assert description.startswith("native kernels (")
    library = Path(re.match(r"native kernels \(([^,)]+\.so)", description).group(1))
    assert library.parent == native.build_dir() and cache.directory_problem(library.parent) is None
    assert cache.library_problem(library) is None
