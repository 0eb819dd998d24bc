"""Downloading from mirrors, exercised against an HTTP server on the loopback interface."""

from __future__ import annotations

import functools
import gzip
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from iwae import data
from iwae.data import FILES, DataError, RemoteFile, locate


@pytest.fixture()
def mirror_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "served"
    (served / "good").mkdir(parents=True)
    (served / "corrupt").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[assignment]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served
    finally:
        server.shutdown()
        server.server_close()


def test_download_falls_back_across_mirrors_and_checks_the_content(
    tmp_path: Path, monkeypatch, mirror_server: tuple[str, Path]
) -> None:
    base, served = mirror_server
    original = Path(data.PACKAGE_DATA) / "mnist" / "t10k-labels-idx1-ubyte.gz"
    (served / "good" / original.name).write_bytes(original.read_bytes())
    (served / "corrupt" / original.name).write_bytes(gzip.compress(b"wrong bytes"))
    remote = FILES["mnist"]["test_labels"]
    mirrors = (base + "missing/", base + "corrupt/", base + "good/")
    monkeypatch.setitem(FILES["fashion-mnist"], "test_labels", RemoteFile(remote.name, remote.digest, mirrors))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("IWAE_DATA_DIR", raising=False)
    (tmp_path / "empty").mkdir()  # an explicit root must exist (a mistyped one is an error); this one holds nothing
    path = locate("fashion-mnist", "test_labels", root=tmp_path / "empty", progress=False)
    assert path == tmp_path / "cache" / "iwae" / "fashion-mnist" / remote.name
    assert path.read_bytes() == original.read_bytes()
    assert not list(path.parent.glob("*.part"))
    # A second call finds the cached file without the network.
    monkeypatch.setitem(FILES["fashion-mnist"], "test_labels", RemoteFile(remote.name, remote.digest, ()))
    assert locate("fashion-mnist", "test_labels", root=tmp_path / "empty", download=False) == path


def test_every_mirror_failing_is_one_clear_line(tmp_path: Path, monkeypatch, mirror_server: tuple[str, Path]) -> None:
    base, _ = mirror_server
    remote = RemoteFile("t10k-labels-idx1-ubyte.gz", FILES["mnist"]["test_labels"].digest, (base + "missing/",))
    monkeypatch.setitem(FILES["fashion-mnist"], "test_labels", remote)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("IWAE_DATA_DIR", raising=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as error:
        locate("fashion-mnist", "test_labels", root=tmp_path / "empty", progress=False)
    assert "could not be downloaded" in str(error.value) and "\n" not in str(error.value)
