"""Dataset loaders: embedded digits, IDX (MNIST/Fashion-MNIST) and CIFAR pickles, and their errors."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkn.cache import WORKER_CACHE
from fedkn.data import embedded
from fedkn.data.datasets import DATASETS, ImageDataset, load_dataset
from fedkn.data.idx import FMNIST_SYSTEM_DIR
from fedkn.errors import FedknError

# --- digits (embedded) ---------------------------------------------------------------------------

def test_digits_loads_offline_with_expected_shapes() -> None:
    train, test = load_dataset("digits"), load_dataset("digits", "test")
    assert isinstance(train, ImageDataset)
    assert len(train) + len(test) == 1797
    assert train.images.shape == (len(train), 1, 16, 16) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.num_classes == 10 and train.in_channels == 1 and train.image_size == (16, 16)
    assert train.classes == test.classes and train.mean == test.mean and train.std == test.std
    assert int(train.images.max()) > 200  # scaled to the full 0..255 range, not 0..16


def test_digits_split_is_disjoint_stratified_and_fixed() -> None:
    _, labels, train_idx, test_idx = embedded._digits_all()
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.array_equal(np.union1d(train_idx, test_idx), np.arange(len(labels)))
    fractions = np.bincount(labels[test_idx]) / np.bincount(labels)
    assert np.all(np.abs(fractions - 0.2) < 0.01)
    WORKER_CACHE.clear("digits")
    again = embedded._digits_all()
    assert np.array_equal(again[3], test_idx)  # independent of any run seed or call order


def test_digits_stats_are_those_of_the_train_split() -> None:
    train = load_dataset("digits")
    pixels = train.images.double() / 255
    assert train.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-6)
    assert train.std[0] == pytest.approx(float(pixels.std(unbiased=False)), abs=1e-6)


def test_unknown_dataset_and_split_are_user_errors() -> None:
    with pytest.raises(FedknError, match="digits, mnist, fmnist, cifar10, cifar100"):
        load_dataset("imagenet")
    with pytest.raises(FedknError, match="'train' or 'test'"):
        load_dataset("digits", "val")
    assert DATASETS == ("digits", "mnist", "fmnist", "cifar10", "cifar100")


# --- IDX -----------------------------------------------------------------------------------------

def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _write_mnist_like(folder: Path, n_train: int, n_test: int, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels"] = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", arrays[f"{prefix}-images"], gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", arrays[f"{prefix}-labels"], gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_fake_mnist_round_trips_in_torchvision_layout(tmp_path: Path, gz: bool) -> None:
    arrays = _write_mnist_like(tmp_path / "MNIST" / "raw", 7, 3, gz)
    train, test = load_dataset("mnist", "train", tmp_path), load_dataset("mnist", "test", tmp_path)
    assert train.images.shape == (7, 1, 28, 28) and test.images.shape == (3, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images"])
    assert np.array_equal(test.labels.numpy(), arrays["t10k-labels"].astype(np.int64))
    assert train.classes == tuple("0123456789") and train.mean == (0.1307,)


def test_fmnist_reads_a_flat_directory_given_as_data_dir(tmp_path: Path) -> None:
    arrays = _write_mnist_like(tmp_path, 5, 2, gz=True)
    test = load_dataset("fmnist", "test", tmp_path)
    assert np.array_equal(test.images[:, 0].numpy(), arrays["t10k-images"])
    assert test.classes[0] == "T-shirt/top" and test.num_classes == 10


def test_missing_idx_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FedknError, match=r"train-images-idx3-ubyte.*not found in .*MNIST/raw") as err:
        load_dataset("mnist", "train", tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(FedknError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fmnist", "train", tmp_path)
    with pytest.raises(FedknError, match="needs a data directory"):
        load_dataset("mnist")


def test_truncated_idx_file_is_a_user_error(tmp_path: Path) -> None:
    _write_mnist_like(tmp_path, 4, 2, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FedknError, match="header promises"):
        load_dataset("mnist", "train", tmp_path)


@pytest.mark.skipif(
    not FMNIST_SYSTEM_DIR.is_dir(), reason=f"{FMNIST_SYSTEM_DIR} absent (apt-get install dataset-fashion-mnist)"
)
def test_real_fashion_mnist_from_the_debian_package() -> None:
    train, test = load_dataset("fmnist"), load_dataset("fmnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert float(train.images.double().mean() / 255) == pytest.approx(train.mean[0], abs=1e-3)


# --- CIFAR ---------------------------------------------------------------------------------------

def _pickle(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj))


def _write_cifar10(root: Path, per_batch: int = 2) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (6, per_batch, 3072), dtype=np.uint8)
    for i in range(5):
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        _pickle(folder / f"data_batch_{i + 1}", {"data": data[i], "labels": labels})
    _pickle(folder / "test_batch", {"data": data[5], "labels": list(range(per_batch))})
    _pickle(folder / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer",
                                                      "dog", "frog", "horse", "ship", "truck"]})
    return data


def test_fake_cifar10_round_trips(tmp_path: Path) -> None:
    data = _write_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", tmp_path)
    assert train.images.shape == (10, 3, 32, 32) and train.in_channels == 3
    assert np.array_equal(train.images[2].numpy().reshape(-1), data[1, 0])  # batch 2, first image
    test = load_dataset("cifar10", "test", tmp_path / "cifar-10-batches-py")  # inner dir works too
    assert test.labels.tolist() == [0, 1] and test.classes[9] == "truck"


def test_fake_cifar100_round_trips(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(3 * 3072, dtype=np.int64).astype(np.uint8).reshape(3, 3072)
    _pickle(folder / "train", {"data": data, "fine_labels": [0, 99, 5], "coarse_labels": [0, 1, 2]})
    _pickle(folder / "test", {"data": data[:1], "fine_labels": [42], "coarse_labels": [3]})
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []})
    train = load_dataset("cifar100", "train", tmp_path)
    assert train.num_classes == 100 and train.labels.tolist() == [0, 99, 5]
    assert np.array_equal(train.images.numpy().reshape(3, -1), data)
    assert load_dataset("cifar100", "test", tmp_path).labels.tolist() == [42]


def test_missing_cifar_file_names_the_file(tmp_path: Path) -> None:
    expected = r"cifar-10-batches-py/batches.meta not found.*torchvision's CIFAR10 dataset, fetched into DIR"
    with pytest.raises(FedknError, match=expected):
        load_dataset("cifar10", "train", tmp_path)
    _write_cifar10(tmp_path / "partial")
    (tmp_path / "partial" / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FedknError, match="data_batch_4 not found"):
        load_dataset("cifar10", "train", tmp_path / "partial")
    with pytest.raises(FedknError, match="needs a data directory"):
        load_dataset("cifar100")
