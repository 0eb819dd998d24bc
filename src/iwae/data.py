"""Datasets: MNIST, Fashion-MNIST, OMNIGLOT and fixed-binarisation MNIST, with Burda's splits.

Images are float32 grey levels in [0, 1], flattened: ``[n, 784]``. With dynamic binarisation
(the default for grey-level data) every use of an example draws a fresh Bernoulli(grey level)
image from a seeded ``torch.Generator`` (:func:`binarize`); fixed-binarisation data are already 0/1.

A file is looked for, in order: in an explicit ``root``, in ``$IWAE_DATA_DIR``, in the cache
directory (``$XDG_CACHE_HOME/iwae`` or ``~/.cache/iwae``), among the files shipped inside the
package (MNIST), and finally downloaded from a list of mirrors. Inside each directory a file may
sit in a sub-directory named after the dataset (``<dir>/mnist/train-images-idx3-ubyte.gz``) or
directly in it. Every file is checked against its checksum when it is loaded. An explicit ``root`` that is not a
folder is an error (:class:`DataError`), not a directory to skip.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import struct
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from iwae.names import TRAIN_SPLITS

PACKAGE_DATA = Path(__file__).parent / "_data"
IDX_VALIDATION_IMAGES = 400  # MNIST and Fashion-MNIST: the last 400 of the 60,000 training images validate (Burda)


class DataError(RuntimeError):
    """A data file is missing, unreadable or fails its checksum (the message says what to do)."""


@dataclass(frozen=True)
class RemoteFile:
    """A data file, its checksum and where it can be downloaded.

    ``digest`` is ``"sha256:<hex>"`` or ``"md5:<hex>"``; for ``.gz`` files it is the digest of the
    decompressed content (so any gzip packaging of the same bytes is accepted), otherwise of the
    file itself. ``None`` means no checksum is known: the file is used and its sha256 reported.
    """

    name: str
    digest: str | None
    mirrors: tuple[str, ...] = ()


_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_OMNIGLOT_MIRRORS = ("https://raw.githubusercontent.com/brendenlake/omniglot/master/python/",)
_AMAT_MIRRORS = ("http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/",)
_CHARDATA_MIRRORS = ("https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/",)

FILES: dict[str, dict[str, RemoteFile]] = {
    "mnist": {
        "train_images": RemoteFile(
            "train-images-idx3-ubyte.gz",
            "sha256:ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            _MNIST_MIRRORS,
        ),
        "train_labels": RemoteFile(
            "train-labels-idx1-ubyte.gz",
            "sha256:65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            _MNIST_MIRRORS,
        ),
        "test_images": RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            "sha256:0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            _MNIST_MIRRORS,
        ),
        "test_labels": RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            "sha256:ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            _MNIST_MIRRORS,
        ),
    },
    "fashion-mnist": {
        "train_images": RemoteFile(
            "train-images-idx3-ubyte.gz",
            "sha256:c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            _FASHION_MIRRORS,
        ),
        "train_labels": RemoteFile(
            "train-labels-idx1-ubyte.gz",
            "sha256:bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            _FASHION_MIRRORS,
        ),
        "test_images": RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            "sha256:5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            _FASHION_MIRRORS,
        ),
        "test_labels": RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            "sha256:0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            _FASHION_MIRRORS,
        ),
    },
    "omniglot": {"chardata": RemoteFile("chardata.mat", None, _CHARDATA_MIRRORS)},
    "omniglot-lake": {
        "background": RemoteFile("images_background.zip", "md5:68d2efa1b9178cc56df9314c21c6e718", _OMNIGLOT_MIRRORS),
        "evaluation": RemoteFile("images_evaluation.zip", "md5:6b91aef0f799c5bb55b94e3f2daec811", _OMNIGLOT_MIRRORS),
    },
    "omniglot-small": {
        "background": RemoteFile(
            "images_background_small1.zip",
            "sha256:f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
            _OMNIGLOT_MIRRORS,
        ),
        "evaluation": RemoteFile(
            "images_background_small2.zip",
            "sha256:3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
            _OMNIGLOT_MIRRORS,
        ),
    },
    "mnist-fixed": {
        split: RemoteFile(f"binarized_mnist_{split}.amat", None, _AMAT_MIRRORS) for split in ("train", "valid", "test")
    },
}
DATASETS = tuple(FILES)


# -- locating, downloading and checking files ---------------------------------------------------
def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iwae"


def _search_dirs(root: str | os.PathLike | None) -> list[Path]:
    dirs = []
    if root is not None:
        if not Path(root).is_dir():  # a mistyped --data-dir would otherwise be skipped in silence
            raise DataError(f"data directory {root} does not exist or is not a folder; pass an existing --data-dir")
        dirs.append(Path(root))
    if os.environ.get("IWAE_DATA_DIR"):
        dirs.append(Path(os.environ["IWAE_DATA_DIR"]))
    dirs.append(cache_dir())
    dirs.append(PACKAGE_DATA)
    return dirs


def file_digest(path: Path, algorithm: str, gzipped: bool | None = None) -> str:
    """Hex digest of a file's content (of the decompressed content for gzip files, by default ``.gz``)."""
    hasher = hashlib.new(algorithm)
    opener = gzip.open if (path.suffix == ".gz" if gzipped is None else gzipped) else open
    try:
        with opener(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                hasher.update(block)
    except (OSError, EOFError) as error:
        raise DataError(f"{path} is unreadable ({error}); delete it and let iwae fetch it again") from error
    return hasher.hexdigest()


def verify(path: Path, remote: RemoteFile) -> None:
    """Raise :class:`DataError` unless ``path`` matches ``remote.digest``."""
    if remote.digest is None:
        return
    algorithm, expected = remote.digest.split(":", 1)
    found = file_digest(path, algorithm, gzipped=remote.name.endswith(".gz"))
    if found != expected:
        raise DataError(
            f"{path} fails its checksum ({algorithm} {found}, expected {expected}); "
            "delete it and let iwae fetch it again, or replace it with the original file"
        )


def _download(remote: RemoteFile, target: Path, progress: bool) -> bool:
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    for mirror in remote.mirrors:
        url = mirror + remote.name
        # A fresh, exclusively created temporary in the target's folder: no planted file or link is written through.
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        partial = Path(name)
        try:
            with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=remote.name, disable=not progress) as bar:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        out.write(block)
                        bar.update(len(block))
            verify(partial, remote)
        except (OSError, DataError):
            partial.unlink(missing_ok=True)
            continue
        os.replace(partial, target)
        return True
    return False


def locate(
    dataset: str,
    key: str,
    root: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = True,
) -> Path:
    """Find (or download) one file of a dataset, check it, and return its path."""
    remote = FILES[dataset][key]
    for directory in _search_dirs(root):
        for candidate in (directory / dataset / remote.name, directory / remote.name):
            if candidate.is_file():
                verify(candidate, remote)
                return candidate
    target = cache_dir() / dataset / remote.name
    if download and remote.mirrors and _download(remote, target, progress):
        return target
    checksum = remote.digest or "no published checksum"
    raise DataError(
        f"{dataset} file {remote.name} ({checksum}) not found and could not be downloaded: "
        f"put it in $IWAE_DATA_DIR/{dataset}/ (or {target.parent}/), or pass --data-dir DIR"
    )


# -- readers -------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: images ``[n, rows, cols]`` uint8 or labels ``[n]`` uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        data = stream.read()
    magic = struct.unpack(">i", data[:4])[0]
    if magic == 2051:
        n, rows, cols = struct.unpack(">iii", data[4:16])
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    if magic == 2049:
        (n,) = struct.unpack(">i", data[4:8])
        return np.frombuffer(data, dtype=np.uint8, offset=8).reshape(n)
    raise DataError(f"{path} is not an IDX file (magic {magic}); replace it with the original file")


def read_amat(path: Path) -> np.ndarray:
    """Read a Larochelle-Murray ``.amat`` file: one image a line, 784 space-separated 0/1 values."""
    values = np.loadtxt(path, dtype=np.float32, ndmin=2)
    if values.shape[1] != 784:
        raise DataError(f"{path} has {values.shape[1]} columns, expected 784")
    return values


def read_chardata(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Burda's OMNIGLOT ``chardata.mat``: ``data``/``testdata`` are pixels x examples, Fortran order."""
    from scipy.io import loadmat

    raw = loadmat(path)

    def reshape(data: np.ndarray) -> np.ndarray:
        return data.T.astype(np.float32).reshape((-1, 28, 28)).reshape((-1, 784), order="F")

    return reshape(raw["data"]), reshape(raw["testdata"])


def read_omniglot_zip(path: Path, size: int = 28) -> tuple[np.ndarray, list[str]]:
    """All PNGs of a Lake OMNIGLOT zip, strokes = 1, resized to ``size x size`` by area averaging.

    Returns the images ``[n, size*size]`` float32 in [0, 1] and each image's ``alphabet/character``.
    """
    from PIL import Image

    images, characters = [], []
    with zipfile.ZipFile(path) as archive:
        for name in sorted(n for n in archive.namelist() if n.endswith(".png")):
            with Image.open(io.BytesIO(archive.read(name))) as image:
                strokes = Image.fromarray((np.asarray(image.convert("L")) < 128).astype(np.uint8) * 255)
                small = strokes.resize((size, size), Image.Resampling.BOX)
            images.append(np.asarray(small, dtype=np.float32).reshape(-1) / 255.0)
            parts = name.split("/")
            characters.append(f"{parts[-3]}/{parts[-2]}")
    return np.stack(images), characters


# -- datasets ------------------------------------------------------------------------------
@dataclass
class Split:
    """One split: images ``[n, 784]`` float32 in [0, 1] and labels ``[n]`` int64 (or None)."""

    images: Tensor
    labels: Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int | None) -> Split:
        if n is None:
            return self
        return Split(self.images[:n], None if self.labels is None else self.labels[:n])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), None if self.labels is None else self.labels.to(device))


@dataclass
class Dataset:
    name: str
    train: Split
    valid: Split
    test: Split
    binarization: str  # "dynamic", "threshold" (pixel >= 0.5), "fixed" (pre-binarised) or "none" (continuous data)
    image_shape: tuple[int, int] = (28, 28)
    train_split: str = "train"  # "train+valid" once for_run has added the validation images to the training set

    def split(self, name: str) -> Split:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split must be train, valid or test, got {name!r}")
        return getattr(self, name)


def binarize(images: Tensor, binarization: str, generator: torch.Generator | None = None) -> Tensor:
    """A fresh Bernoulli(grey level) draw for ``"dynamic"`` binarisation; ``pixel >= 0.5`` for ``"threshold"``; the
    data unchanged otherwise (``"fixed"`` for pre-binarised images, ``"none"`` for continuous data)."""
    if binarization == "dynamic":
        return torch.bernoulli(images, generator=generator)
    if binarization == "threshold":
        return (images >= 0.5).to(images.dtype)
    return images


def for_run(dataset: Dataset, binarization: str | None = None, train_split: str = "train") -> Dataset:
    """The dataset as a run sees it; applied twice, it changes nothing the second time.

    Args:
        dataset: the loaded dataset.
        binarization: None (the dataset's own), or ``dynamic`` or ``threshold`` for grey-level data.
        train_split: ``train`` (Burda's split) or ``train+valid`` (every training image, as some reproductions do;
            the validation images then lie inside the training set).
    """
    if binarization is not None and binarization != dataset.binarization:
        if dataset.binarization != "dynamic":
            raise DataError(
                f"{dataset.name} is {dataset.binarization}-binarised already; binarization {binarization!r} needs "
                "grey-level data (mnist, fashion-mnist, omniglot)"
            )
        dataset = replace(dataset, binarization=binarization)
    if train_split not in TRAIN_SPLITS:
        raise ValueError(f"train_split must be one of {', '.join(TRAIN_SPLITS)}, got {train_split!r}")
    if train_split != dataset.train_split:
        if dataset.train_split != "train":
            raise ValueError(f"{dataset.name}'s training set is {dataset.train_split} already; load it afresh")
        train, valid = dataset.train, dataset.valid
        labels = None if train.labels is None or valid.labels is None else torch.cat([train.labels, valid.labels])
        dataset = replace(
            dataset, train=Split(torch.cat([train.images, valid.images]), labels), train_split=train_split
        )
    return dataset


def _split_tail(images: np.ndarray, labels: np.ndarray | None, n_valid: int) -> tuple[Split, Split]:
    def make(sl: slice) -> Split:
        return Split(
            torch.from_numpy(np.ascontiguousarray(images[sl])),
            None if labels is None else torch.from_numpy(labels[sl].astype(np.int64)),
        )

    n_train = images.shape[0] - n_valid
    return make(slice(0, n_train)), make(slice(n_train, None))


def _load_idx_dataset(name: str, root, download: bool, progress: bool) -> Dataset:
    def read(key: str) -> np.ndarray:
        return read_idx(locate(name, key, root, download, progress))

    train_x = read("train_images").reshape(-1, 784).astype(np.float32) / 255.0
    test_x = read("test_images").reshape(-1, 784).astype(np.float32) / 255.0
    train, valid = _split_tail(train_x, read("train_labels"), n_valid=IDX_VALIDATION_IMAGES)  # Burda: 59,600 / 400
    test = Split(torch.from_numpy(test_x), torch.from_numpy(read("test_labels").astype(np.int64)))
    return Dataset(name, train, valid, test, "dynamic")


def _load_omniglot(root, download: bool, progress: bool) -> Dataset:
    train_x, test_x = read_chardata(locate("omniglot", "chardata", root, download, progress))
    permutation = np.random.RandomState(123).permutation(train_x.shape[0])
    train, valid = _split_tail(train_x[permutation], None, n_valid=1345)
    return Dataset("omniglot", train, valid, Split(torch.from_numpy(test_x)), "dynamic")


def _load_omniglot_zips(name: str, root, download: bool, progress: bool) -> Dataset:
    background, bg_chars = read_omniglot_zip(locate(name, "background", root, download, progress))
    evaluation, ev_chars = read_omniglot_zip(locate(name, "evaluation", root, download, progress))
    # The two small zips share alphabets (Greek, Latin): keep only unseen alphabets for testing.
    seen = {c.split("/")[0] for c in bg_chars}
    keep = np.array([c.split("/")[0] not in seen for c in ev_chars], dtype=bool)
    evaluation, ev_chars = evaluation[keep], [c for c, k in zip(ev_chars, keep, strict=True) if k]
    classes = {c: i for i, c in enumerate(sorted(set(bg_chars) | set(ev_chars)))}
    bg_labels = np.array([classes[c] for c in bg_chars])
    permutation = np.random.RandomState(123).permutation(background.shape[0])
    n_valid = max(1, round(0.05 * background.shape[0]))
    train, valid = _split_tail(background[permutation], bg_labels[permutation], n_valid)
    test = Split(torch.from_numpy(evaluation), torch.tensor([classes[c] for c in ev_chars]))
    return Dataset(name, train, valid, test, "dynamic")


def _load_mnist_fixed(root, download: bool, progress: bool) -> Dataset:
    splits = {
        split: Split(torch.from_numpy(read_amat(locate("mnist-fixed", split, root, download, progress))))
        for split in ("train", "valid", "test")
    }
    return Dataset("mnist-fixed", splits["train"], splits["valid"], splits["test"], "fixed")


def load_dataset(
    name: str, root: str | os.PathLike | None = None, download: bool = True, progress: bool = True
) -> Dataset:
    """Load a dataset by name: ``mnist``, ``fashion-mnist``, ``omniglot`` (Burda's ``chardata.mat``),
    ``omniglot-lake`` (the official background/evaluation zips at 28x28), ``omniglot-small`` (Lake's
    two small background zips) or ``mnist-fixed`` (Larochelle and Murray's fixed binarisation)."""
    if name in ("mnist", "fashion-mnist"):
        return _load_idx_dataset(name, root, download, progress)
    if name == "omniglot":
        return _load_omniglot(root, download, progress)
    if name in ("omniglot-lake", "omniglot-small"):
        return _load_omniglot_zips(name, root, download, progress)
    if name == "mnist-fixed":
        return _load_mnist_fixed(root, download, progress)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
