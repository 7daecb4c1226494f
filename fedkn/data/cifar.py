"""CIFAR-10 and CIFAR-100 from torchvision's python-pickle layout.

``data_dir`` may be torchvision's ``root`` (holding ``cifar-10-batches-py/`` or
``cifar-100-python/``) or that inner directory itself. The pickles are the official ones, read
the same way torchvision reads them (``encoding="latin1"``); only load directories you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fedkn.errors import FedknError

_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": {
        "subdir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "labels": "labels",
        "torchvision": "CIFAR10",
    },
    "cifar100": {
        "subdir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "labels": "fine_labels",
        "torchvision": "CIFAR100",
    },
}


def load_cifar(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images uint8 (N,3,32,32), labels, classes) of ``split`` of ``"cifar10"`` or ``"cifar100"``."""
    layout = _LAYOUT[name]
    how = (
        f"torchvision's {layout['torchvision']} dataset, fetched into DIR on a machine with internet access, "
        "creates it; then copy DIR here and pass it as data_dir"
    )
    if data_dir is None:
        raise FedknError(f"dataset {name!r} needs a data directory; {how}.")
    root = Path(data_dir)
    folder = root if root.name == layout["subdir"] else root / layout["subdir"]

    meta_file, meta_key = layout["meta"]
    classes = tuple(str(c) for c in _unpickle(folder / meta_file, how, (meta_key,))[meta_key])
    images, labels = [], []
    for batch in layout[split]:
        entry = _unpickle(folder / batch, how, ("data", layout["labels"]))
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.size % (3 * 32 * 32):
            raise FedknError(f"{folder / batch} does not hold whole 3x32x32 images; replace it with the original file.")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[layout["labels"]], dtype=np.int64))
    images_arr, labels_arr = np.concatenate(images), np.concatenate(labels)
    if images_arr.shape[0] != labels_arr.shape[0] or (labels_arr.size and labels_arr.max() >= len(classes)):
        raise FedknError(f"{name} {split} files in {folder} are inconsistent; replace them with a complete copy.")
    return images_arr, labels_arr, classes


def _unpickle(path: Path, how: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise FedknError(f"CIFAR file {path} not found; {how}.")
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise FedknError(f"cannot read {path} ({err}); replace it with a complete copy.") from None
    if not isinstance(entry, dict) or any(key not in entry for key in keys):
        raise FedknError(f"{path} is not a CIFAR pickle with {', '.join(keys)}; replace it with the original file.")
    return entry
