"""A TFDS builder for Fashion-MNIST that works offline and never needs TensorFlow.

``IecFashionMnist`` (registered as ``iec_fashion_mnist``, so it does not clash with TFDS's
own ``fashion_mnist``) writes the 60,000 training and 10,000 test images in TFDS's
``array_record`` file format with plain Tensor features: ``image`` uint8 (28, 28, 1), stored
as raw bytes, and ``label`` int64 (a ClassLabel with the ten garment names). Writing and
reading go through NumPy, protobuf and array_record only; TFDS's Image feature would need
TensorFlow to encode the PNGs.

Where the four IDX files come from, first match wins:

1. ``idx_dir``, the builder argument (``tfds.builder("iec_fashion_mnist", idx_dir=...)``):
   an explicit directory must hold all four files, or the build fails.
2. TFDS's manual directory (``DownloadConfig(manual_dir=...)``, default
   ``<data_dir>/downloads/manual``), if it holds any of them.
3. The Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
4. The standard URLs (TFDS's ``fashion_mnist`` URLs, verified against TFDS's registered
   SHA-256 checksums), unless the builder was made with ``download=False``. Offline, a
   quick reachability check fails at once with a clear ConnectionError.

Each file may be gzip-compressed (``train-images-idx3-ubyte.gz``, as distributed) or not
(``train-images-idx3-ubyte``). Every file is checked before anything is written: gzip
integrity, the IDX magic number (2051 for images, 2049 for labels), the dimensions
(N×28×28 and N), the exact byte length, the split's example count, matching image and label
counts, and labels in 0..9. A bad file raises :class:`IdxFormatError` naming the file.
TFDS writes into ``<data_dir>/iec_fashion_mnist/incomplete.*`` and renames it to
``<data_dir>/iec_fashion_mnist/1.0.0`` only on success, so a failed build leaves no
dataset behind.

Records are written in IDX order (``disable_shuffling=True``): record i of a split is image
i of its IDX file. The loader shuffles; a stored order equal to the source order makes the
data easy to check.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

__all__ = [
    "IdxFormatError",
    "IecFashionMnist",
    "DEBIAN_IDX_DIR",
    "IDX_FILES",
    "LABEL_NAMES",
    "NUM_EXAMPLES",
    "URL",
    "read_idx",
    "read_split",
]

# Where Debian's `dataset-fashion-mnist` package installs the four files.
DEBIAN_IDX_DIR = "/usr/share/datasets/fashion-mnist"
# TFDS's `fashion_mnist` download location; its checksums ship inside TFDS
# (tensorflow_datasets/url_checksums/fashion_mnist.txt).
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# split -> (images file, labels file), without the .gz suffix.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL_NAMES = tuple(name for pair in IDX_FILES.values() for name in pair)
NUM_EXAMPLES = {"train": 60_000, "test": 10_000}
LABEL_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SHAPE = (28, 28, 1)
_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.
_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.

_CITATION = """\
@article{xiao2017fashion,
  title   = {Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms},
  author  = {Han Xiao and Kashif Rasul and Roland Vollgraf},
  journal = {CoRR},
  volume  = {abs/1708.07747},
  year    = {2017},
}
"""


class IdxFormatError(ValueError):
    """An IDX file is unreadable, truncated, or does not hold what Fashion-MNIST holds."""


def _read_bytes(path: str) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
        raise IdxFormatError(f"{path}: corrupt gzip data ({e})") from e


def read_idx(path: str, *, magic: int, shape: Sequence[int | None]) -> np.ndarray:
    """Reads one unsigned-byte IDX file, gzip-compressed or not.

    Args:
      path: the file.
      magic: the expected magic number (2051 for an image file, 2049 for a label file).
      shape: the expected dimensions; ``None`` accepts any size in that place.

    Returns:
      A read-only uint8 array of the file's dimensions.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      IdxFormatError: bad gzip data, a wrong magic number or dimensions, or a data length
        that does not match the header (a truncated or padded file).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = _read_bytes(path)
    ndim = len(shape)
    header_len = 4 * (1 + ndim)
    if len(data) < header_len:
        raise IdxFormatError(f"{path}: {len(data)} bytes, shorter than an IDX header")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise IdxFormatError(
            f"{path}: magic number {found_magic}, expected {magic} "
            f"(unsigned bytes in {ndim} dimension(s))"
        )
    dims = tuple(int.from_bytes(data[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(ndim))
    if any(want is not None and got != want for got, want in zip(dims, shape)):
        raise IdxFormatError(f"{path}: dimensions {dims}, expected {tuple(shape)}")
    size = int(np.prod(dims))
    if len(data) - header_len != size:
        raise IdxFormatError(
            f"{path}: {len(data) - header_len} data bytes, the header {dims} says {size} "
            "(truncated or corrupt file)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def _locate(directory: str, name: str) -> str | None:
    """``directory/name.gz`` or ``directory/name``, whichever exists (gzip first)."""
    for candidate in (name + ".gz", name):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _find_files(directory: str) -> dict[str, str]:
    """Maps each IDX file name (without .gz) found in ``directory`` to its path."""
    found = {name: _locate(directory, name) for name in _ALL_NAMES}
    return {name: path for name, path in found.items() if path is not None}


def _all_files(directory: str, what: str) -> dict[str, str]:
    """All four files of ``directory``; FileNotFoundError naming the missing ones."""
    found = _find_files(directory)
    missing = [name + "[.gz]" for name in _ALL_NAMES if name not in found]
    if missing:
        raise FileNotFoundError(
            f"{what} lacks {', '.join(missing)}: it must hold all four Fashion-MNIST IDX files"
        )
    return found


def read_split(images_path: str, labels_path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads and checks one split: uint8 images (N, 28, 28, 1) and int64 labels (N,)."""
    n = NUM_EXAMPLES[split]
    labels = read_idx(labels_path, magic=_LABELS_MAGIC, shape=(None,))
    images = read_idx(images_path, magic=_IMAGES_MAGIC, shape=(None, 28, 28))
    if len(labels) != n or len(images) != n:
        raise IdxFormatError(
            f"Fashion-MNIST {split} has {n} examples; found {len(images)} images in "
            f"{images_path} and {len(labels)} labels in {labels_path}"
        )
    if labels.max() >= len(LABEL_NAMES):
        raise IdxFormatError(f"{labels_path}: label {labels.max()} outside 0..9")
    return images.reshape((n,) + IMAGE_SHAPE), labels.astype(np.int64)


def _check_reachable(url: str, searched: str, timeout: float = 10.0) -> None:
    """Fails fast when offline: TFDS's downloader would retry for minutes before failing."""
    import requests

    try:
        requests.head(url, timeout=timeout)
    except requests.RequestException as e:
        raise ConnectionError(
            f"No local Fashion-MNIST IDX files (searched {searched}) and {url} is "
            f"unreachable ({e}). Install Debian's dataset-fashion-mnist package or pass "
            "idx_dir=..."
        ) from e


class IecFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from local IDX files, in array_record format with Tensor features."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional. Place the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; "
        "gzipped or not) in the manual directory, or pass idx_dir=..., or install Debian's "
        "dataset-fashion-mnist package. Otherwise they are downloaded from " + URL
    )
    # Searched after idx_dir and the manual directory; tests may replace it.
    DEFAULT_IDX_DIRS: tuple[str, ...] = (DEBIAN_IDX_DIR,)

    def __init__(
        self,
        *,
        idx_dir: str | os.PathLike | None = None,
        download: bool = True,
        file_format: str = "array_record",
        **kwargs,
    ):
        """Makes the builder; the module docstring says where the IDX files come from.

        Args:
          idx_dir: a directory holding the four IDX files; it must hold all of them.
          download: when no local copy is found, download (True) or raise (False).
          file_format: TFDS record format; ``array_record`` gives random access
            (``tfds.data_source``) without TensorFlow.
          **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``, ...).
        """
        self._idx_dir = None if idx_dir is None else os.fspath(idx_dir)
        self._download = download
        super().__init__(file_format=file_format, **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def _checksums_path(cls) -> epath.Path:
        """TFDS's registered checksums for the standard Fashion-MNIST URLs."""
        return tfds.core.utils.tfds_path() / "url_checksums" / "fashion_mnist.txt"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Fashion-MNIST (Zalando): 28x28 grayscale images of 10 garment classes, "
                "60,000 train and 10,000 test, in IDX record order. Tensor features, "
                "readable without TensorFlow."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=IMAGE_SHAPE,
                        dtype=np.uint8,
                        encoding=tfds.features.Encoding.BYTES,
                    ),
                    "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            citation=_CITATION,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _local_files(self, dl_manager) -> tuple[dict[str, str], str] | None:
        """The four files from the first local directory that has any, and that directory."""
        if self._idx_dir is not None:
            if not os.path.isdir(self._idx_dir):
                raise FileNotFoundError(f"idx_dir {self._idx_dir!r} is not a directory")
            return _all_files(self._idx_dir, f"idx_dir {self._idx_dir!r}"), self._idx_dir
        candidates = []
        try:
            candidates.append(os.fspath(dl_manager.manual_dir))
        except AssertionError:  # TFDS: no manual directory, or an empty one.
            pass
        candidates.extend(self.DEFAULT_IDX_DIRS)
        for directory in candidates:
            if os.path.isdir(directory) and _find_files(directory):
                return _all_files(directory, directory), directory
        return None

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Finds the IDX files (see the module docstring), checks them, then writes."""
        local = self._local_files(dl_manager)
        searched = ", ".join(["the manual directory", *self.DEFAULT_IDX_DIRS])
        if local is not None:
            paths, source = local
        elif self._download:
            _check_reachable(URL, searched)
            urls = {name: URL + name + ".gz" for name in _ALL_NAMES}
            paths = {name: os.fspath(p) for name, p in dl_manager.download(urls).items()}
            source = URL
        else:
            raise FileNotFoundError(
                f"No Fashion-MNIST IDX files found (searched {searched}) and download=False. "
                "Install Debian's dataset-fashion-mnist package or pass idx_dir=..."
            )
        # Read and check every file before the first record is written.
        arrays = {
            split: read_split(paths[images], paths[labels], split)
            for split, (images, labels) in IDX_FILES.items()
        }
        self.info.metadata["source"] = source
        return {split: self._generate_examples(*pair) for split, pair in arrays.items()}

    def _generate_examples(
        self, images: np.ndarray, labels: np.ndarray
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yields (index, example) in IDX order."""
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image, "label": label}
