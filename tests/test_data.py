"""iwae.data: the datasets, their files and checksums, binarisation (dynamic, fixed, the authors' threshold),
the training split of a run, and downloading from mirrors, exercised against an HTTP server on the loopback
interface."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from iwae import data
from iwae.data import (
    FILES,
    DataError,
    Dataset,
    RemoteFile,
    Split,
    binarize,
    for_run,
    load_dataset,
    locate,
    read_chardata,
)


def test_mnist_counts_split_and_labels(mnist) -> None:
    assert (len(mnist.train), len(mnist.valid), len(mnist.test)) == (59_600, 400, 10_000)
    assert mnist.train.images.shape == (59_600, 784) and mnist.train.images.dtype == torch.float32
    all_train = torch.cat([mnist.train.labels, mnist.valid.labels])
    assert all_train[0].item() == 5 and mnist.test.labels[0].item() == 7
    expected_train = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    expected_test = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(all_train).tolist() == expected_train
    assert torch.bincount(mnist.test.labels).tolist() == expected_test
    mean_pixel = torch.cat([mnist.train.images, mnist.valid.images]).double().mean().item() * 255
    assert mean_pixel == pytest.approx(33.3184, abs=1e-3)
    assert mnist.binarization == "dynamic"


def test_dynamic_binarisation_matches_grey_levels(mnist) -> None:
    images = mnist.test.images[:50]
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([binarize(images, "dynamic", generator) for _ in range(400)])
    assert set(torch.unique(draws).tolist()) <= {0.0, 1.0}
    # The std of a mean of 400 Bernoulli draws is at most 0.025; 0.15 is 6 standard deviations.
    assert (draws.mean(0) - images).abs().max() < 0.15
    assert (draws.mean(0) - images).abs().mean() < 0.01
    again = binarize(images, "dynamic", torch.Generator().manual_seed(0))
    assert torch.equal(again, draws[0])  # seeded: reproducible
    assert not torch.equal(draws[0], draws[1])  # fresh draw on every use
    assert torch.equal(binarize(images, "fixed"), images)


def test_fashion_mnist_from_shared_data(shared_data: Path) -> None:
    fashion = load_dataset("fashion-mnist", root=shared_data, download=False, progress=False)
    assert (len(fashion.train), len(fashion.valid), len(fashion.test)) == (59_600, 400, 10_000)
    assert torch.bincount(fashion.test.labels).tolist() == [1000] * 10
    assert fashion.test.labels[0].item() == 9


def test_omniglot_small_zips(shared_data: Path) -> None:
    omniglot = load_dataset("omniglot-small", root=shared_data / "omniglot-small", download=False, progress=False)
    assert len(omniglot.train) + len(omniglot.valid) == 2720
    assert len(omniglot.test) == (47 + 42 + 17) * 20  # alphabets of small2 not in small1
    assert omniglot.train.images.shape[1] == 784
    images = omniglot.train.images
    assert images.min() >= 0 and images.max() <= 1
    stroke_fraction = images.mean().item()
    assert 0.03 < stroke_fraction < 0.35  # strokes are the minority (about 10% at 105x105, thicker at 28x28)


def _write_chardata(path: Path, train: np.ndarray, test: np.ndarray) -> None:
    from scipy.io import savemat

    savemat(path, {"data": train.T, "testdata": test.T})


def test_chardata_mat_fortran_order_and_burda_split(tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    train = (rng.random((24_345, 784)) < 0.1).astype(np.float32)
    test = (rng.random((30, 784)) < 0.1).astype(np.float32)
    image = np.zeros((28, 28), dtype=np.float32)
    image[0, 1] = 1.0  # row 0, column 1
    train[0] = image.reshape(-1)
    _write_chardata(tmp_path / "chardata.mat", train, test)
    loaded_train, loaded_test = read_chardata(tmp_path / "chardata.mat")
    # Burda's reshape: the stored 784-vector is read column-major, so (0, 1) becomes (1, 0).
    assert loaded_train[0].reshape(28, 28)[1, 0] == 1.0 and loaded_train[0].sum() == 1.0
    assert loaded_test.shape == (30, 784)
    monkeypatch.setitem(FILES["omniglot"], "chardata", RemoteFile("chardata.mat", None))
    omniglot = load_dataset("omniglot", root=tmp_path, download=False, progress=False)
    assert (len(omniglot.train), len(omniglot.valid), len(omniglot.test)) == (23_000, 1345, 30)
    permutation = np.random.RandomState(123).permutation(24_345)
    np.testing.assert_array_equal(omniglot.valid.images.numpy(), loaded_train[permutation[-1345:]])


def test_amat_fixed_binarisation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split, n in (("train", 7), ("valid", 3), ("test", 4)):
        rows = (rng.random((n, 784)) < 0.2).astype(int)
        (tmp_path / f"binarized_mnist_{split}.amat").write_text("\n".join(" ".join(map(str, r)) for r in rows))
    fixed = load_dataset("mnist-fixed", root=tmp_path, download=False, progress=False)
    assert (len(fixed.train), len(fixed.valid), len(fixed.test)) == (7, 3, 4)
    assert fixed.binarization == "fixed"
    assert torch.equal(binarize(fixed.test.images, fixed.binarization), fixed.test.images)


def test_checksum_failure_is_one_clear_line(tmp_path: Path) -> None:
    target = tmp_path / "mnist"
    target.mkdir()
    with gzip.open(target / "t10k-labels-idx1-ubyte.gz", "wb") as out:
        out.write(b"not mnist")
    with pytest.raises(DataError) as error:
        locate("mnist", "test_labels", root=tmp_path, download=False)
    message = str(error.value)
    assert "fails its checksum" in message and "\n" not in message


def test_gzip_repackaging_is_accepted(tmp_path: Path) -> None:
    """The checksum covers the decompressed content, so a mirror's different gzip header is fine."""
    source = Path(data.PACKAGE_DATA) / "mnist" / "t10k-labels-idx1-ubyte.gz"
    content = gzip.decompress(source.read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))
    assert locate("mnist", "test_labels", root=tmp_path, download=False).parent == tmp_path


def test_missing_file_offline_names_file_checksum_and_place(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("IWAE_DATA_DIR", raising=False)
    with pytest.raises(DataError) as error:
        locate("fashion-mnist", "test_labels", root=tmp_path, download=False)
    message = str(error.value)
    assert "t10k-labels-idx1-ubyte.gz" in message and "sha256:" in message and "IWAE_DATA_DIR" in message
    assert "\n" not in message


def test_search_order_env_dir(tmp_path: Path, monkeypatch, shared_data: Path) -> None:
    monkeypatch.setenv("IWAE_DATA_DIR", str(tmp_path))
    (tmp_path / "fashion-mnist").mkdir()
    shutil.copy(shared_data / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz", tmp_path / "fashion-mnist")
    found = locate("fashion-mnist", "test_labels", download=False)
    assert found == tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"


def test_shipped_mnist_matches_published_digests() -> None:
    for remote in FILES["mnist"].values():
        path = Path(data.PACKAGE_DATA) / "mnist" / remote.name
        assert f"sha256:{hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()}" == remote.digest
    assert (Path(data.PACKAGE_DATA) / "mnist" / "LICENSE").is_file()


def test_omniglot_zip_reader_inverts_and_resizes(tmp_path: Path) -> None:
    from PIL import Image

    image = Image.new("1", (105, 105), 1)
    for i in range(105):
        image.putpixel((i, 52), 0)  # one horizontal stroke
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("top/Alpha/character01/0101_01.png", "top/Alpha/character02/0102_01.png"):
            png = tmp_path / "x.png"
            image.save(png)
            archive.write(png, name)
    images, characters = data.read_omniglot_zip(path)
    assert images.shape == (2, 784) and characters == ["Alpha/character01", "Alpha/character02"]
    grid = images[0].reshape(28, 28)
    row_sums = grid.sum(axis=1)
    assert row_sums.argmax() in (13, 14) and row_sums.max() > 5  # the stroke (row 52 of 105) is bright
    assert row_sums[0] == 0 and row_sums[27] == 0  # the background is dark


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


def tiny_dataset(binarization: str = "dynamic") -> Dataset:
    images = torch.rand(10, 784, generator=torch.Generator().manual_seed(1))
    return Dataset("toy", Split(images[:8], torch.arange(8)), Split(images[8:], torch.arange(8, 10)), Split(images),
                   binarization)  # fmt: skip


def test_threshold_binarisation_and_every_training_image() -> None:
    images = torch.tensor([[0.0, 0.49, 0.5, 0.51, 1.0]])
    assert binarize(images, "threshold").tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]]
    data = tiny_dataset()
    threshold = for_run(data, "threshold")
    assert threshold.binarization == "threshold" and threshold.train is data.train
    whole = for_run(data, None, "train+valid")
    assert len(whole.train) == 10 and whole.train.labels.tolist() == list(range(10)) and len(whole.valid) == 2
    assert for_run(whole, None, "train+valid") is whole  # applied twice: nothing more
    with pytest.raises(DataError, match="binarised already"):
        for_run(tiny_dataset("fixed"), "threshold")
