"""MNIST and Fashion-MNIST from their IDX files (plain or gzipped), parsed with numpy.

Accepted layouts, under ``data_dir``: the four files directly, or torchvision's
``MNIST/raw/`` / ``FashionMNIST/raw/``. Without ``data_dir``, Fashion-MNIST is read in place from
the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fedkn.errors import FedknError

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_CLASSES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(d) for d in range(10)),
    "fmnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
}
_TORCHVISION_SUBDIR = {"mnist": Path("MNIST", "raw"), "fmnist": Path("FashionMNIST", "raw")}
_HOW_TO_GET = {
    "mnist": "copy the MNIST IDX files there (fetched with torchvision's MNIST dataset on a machine "
    "with internet access) and pass that directory as data_dir",
    "fmnist": "install them with `apt-get install dataset-fashion-mnist` "
    "or pass the directory holding them as data_dir",
}
_PREFIX = {"train": "train", "test": "t10k"}
_UBYTE_DTYPE = 0x08


def load_mnist_like(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images uint8 (N,1,28,28), labels, classes) of ``split`` of ``"mnist"`` or ``"fmnist"``."""
    if data_dir is None:
        if name != "fmnist":
            raise FedknError(f"dataset {name!r} needs a data directory; {_HOW_TO_GET[name]}.")
        root = FMNIST_SYSTEM_DIR
    else:
        root = Path(data_dir)
    prefix = _PREFIX[split]
    images = _read_idx(_find(name, root, f"{prefix}-images-idx3-ubyte"), ndim=3)
    labels = _read_idx(_find(name, root, f"{prefix}-labels-idx1-ubyte"), ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise FedknError(
            f"{name} {split} split has {images.shape[0]} images but {labels.shape[0]} labels; "
            f"replace the files in {root} with a complete copy."
        )
    if images.shape[1:] != (28, 28):
        raise FedknError(f"{name} {split} images are {images.shape[1:]} instead of 28x28; check the files in {root}.")
    if labels.size and labels.max() >= len(_CLASSES[name]):
        raise FedknError(
            f"{name} {split} labels go up to {labels.max()} but there are 10 classes; check the files in {root}."
        )
    return images[:, None], labels.astype(np.int64), _CLASSES[name]


def _find(name: str, root: Path, stem: str) -> Path:
    for directory in (root, root / _TORCHVISION_SUBDIR[name]):
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise FedknError(
        f"{name} file {stem}[.gz] not found in {root} or {root / _TORCHVISION_SUBDIR[name]}; {_HOW_TO_GET[name]}."
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes: magic (0, 0, 0x08, ndim), big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:  # gzip raises these for truncated or non-gzip files
        raise FedknError(f"cannot read {path} ({err}); replace it with a complete copy.") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE_DTYPE or raw[3] != ndim:
        raise FedknError(
            f"{path} is not a {ndim}-dimensional unsigned-byte IDX file; replace it with the original file."
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise FedknError(
            f"{path} holds {len(raw) - header} data bytes but its header promises {shape}; "
            "replace it with a complete copy."
        )
    # Copy: frombuffer is read-only and torch.from_numpy needs a writable array.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()
