"""The trainer's data sets (eotfast/ddpm/data.py): the bundled digits, a few training steps on
each file format (written here: HDF5, image folders, MNIST's idx files), and the files that
cannot be read, named before training. CPU only."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from eotfast.ddpm.data import DataError, load_dataset
from eotfast.ddpm.metrics import hue_degrees
from eotfast.ddpm.trainer import run


def write_hdf5(path: Path, count: int, size: int, seed: int) -> None:
    h5py = pytest.importorskip("h5py")
    images = np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)
    with h5py.File(path, "w") as file:
        file.create_dataset("imgs", data=images)


def write_image_folder(folder: Path, count: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(count):  # non-square on purpose: the loader center-crops
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), np.uint8)).save(folder / f"{k}.png")


def write_png_folders(root: Path, count: int = 12) -> None:
    write_image_folder(root / "trainA", count, seed=0)
    write_image_folder(root / "trainB", count, seed=1)


def write_mnist_idx(root: Path, count: int) -> None:
    """Synthetic MNIST in torchvision's raw layout (idx files), digits 0..9 cycling."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (count, 28, 28), np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, count) + labels.tobytes())  # fmt: skip


def test_digits_are_colored_split_and_uint8():
    data = load_dataset("digits", None, image_size=16, source_digit=2, target_digit=3)
    assert data.train_source.dtype == torch.uint8 and data.train_source.shape[1:] == (3, 16, 16)
    # scikit-learn's digits: 177 twos and 183 threes; 20% of each held out (stratified).
    assert len(data.train_source) + len(data.test_source) == 177
    assert len(data.train_target) + len(data.test_target) == 183
    assert abs(len(data.test_source) - 0.2 * 177) <= 1
    hues = hue_degrees(data.train_source.float() / 255)
    assert torch.isfinite(hues).all() and hues.std() > 60  # spread over the color circle


@pytest.mark.parametrize("kind", ["shoes2bags", "folders", "cmnist"])
def test_few_training_steps_on_each_file_dataset(tmp_path, kind, tiny_config, train_losses):
    root = tmp_path / "data"
    root.mkdir()
    if kind == "shoes2bags":
        write_hdf5(root / "shoes_64.hdf5", 30, 64, seed=0)
        write_hdf5(root / "handbag_64.hdf5", 40, 64, seed=1)
    elif kind == "folders":
        write_image_folder(root / "trainA", 12, seed=0)
        write_image_folder(root / "trainB", 14, seed=1)
    else:
        write_mnist_idx(root, 60)
    metrics = run(tiny_config(tmp_path, dataset=kind, data_root=str(root)), progress=False)
    out = tmp_path / "run"
    assert {"psnr", "ssim", "input_output_rmse"} <= metrics.keys()
    assert all(np.isfinite(v) for v in metrics.values())
    assert (kind == "cmnist") == ("target_accuracy" in metrics and "hue_error_median" in metrics)
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert (out / "checkpoint.pt").is_file() and (out / "config.json").is_file()
    assert (out / "samples" / "step_000003.png").is_file()


def test_missing_data_message_names_files_and_source(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset("shoes2bags", tmp_path, 64)
    text = str(error.value)
    assert "shoes_64.hdf5" in text and "handbag_64.hdf5" in text and "iGAN" in text


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    # PIL's convert("RGB") clips 16-bit grayscale: mid-gray 30000/65535 read as white.
    from PIL import Image

    from eotfast.ddpm.data import _read_image_folder

    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(tmp_path / "gray16.png")
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(tmp_path / "rgb8.png")
    images = _read_image_folder(tmp_path, image_size=4)  # sorted: gray16, rgb8
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 4, 4)
    assert (images[0] == round(30000 / 257)).all(), images[0].unique()
    assert (images[1] == 200).all()


@pytest.mark.parametrize("bad", ["not_an_image", "empty", "truncated", "directory", "dangling"])
def test_bad_files_in_an_image_folder_are_named(tmp_path, bad, cli_error, tiny_args):
    root = tmp_path / "data"
    write_png_folders(root)
    target = root / "trainA" / "bad.png"
    if bad == "not_an_image":
        target.write_text("hello")
    elif bad == "empty":
        target.write_bytes(b"")
    elif bad == "truncated":
        data = (root / "trainA" / "0.png").read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif bad == "directory":
        target.mkdir()
    else:
        target.symlink_to(root / "missing.png")
    err = cli_error(*tiny_args, "--dataset", "folders", "--data-root", root,
                    "--out-dir", tmp_path / "run")  # fmt: skip
    assert "bad.png" in err


@pytest.mark.parametrize("case", ["no_images", "group", "one_image"])
def test_unusable_hdf5_files_are_found_before_training(tmp_path, case, cli_error, tiny_args):
    h5py = pytest.importorskip("h5py")
    root = tmp_path / "data"
    root.mkdir()
    write_hdf5(root / "handbag_64.hdf5", 20, 64, seed=1)
    with h5py.File(root / "shoes_64.hdf5", "w") as file:
        if case == "no_images":
            file.create_dataset("imgs", data=np.zeros((0, 64, 64, 3), np.uint8))
        elif case == "group":
            file.create_group("imgs")
        else:
            file.create_dataset("imgs", data=np.zeros((1, 64, 64, 3), np.uint8))
    err = cli_error(*tiny_args, "--dataset", "shoes2bags", "--data-root", root,
                    "--image-size", "16", "--out-dir", tmp_path / "run")  # fmt: skip
    assert "shoes_64.hdf5" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    if case == "one_image":
        assert "too few to hold out a test split" in err


def test_cmnist_with_empty_idx_files_is_a_data_error(tmp_path, cli_error, tiny_args):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # fmt: skip
        (raw / name).write_bytes(b"")
    err = cli_error(*tiny_args, "--dataset", "cmnist", "--data-root", tmp_path / "data",
                    "--out-dir", tmp_path / "run")  # fmt: skip
    assert "cmnist" in err and "MNIST" in err
