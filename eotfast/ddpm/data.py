"""Unpaired two-domain image data sets for the trainer, kept as uint8 tensors [N, 3, H, W].

Every loader returns a :class:`DomainData`: train and test images of the source and target
domains at ``image_size``, plus, for labelled data sets, what the evaluation classifier is
trained on. Files are read from local paths only; a missing file raises :class:`DataError`
whose message names the expected files and where to get them.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DATASETS", "DataError", "DomainData", "load_dataset", "colorize", "resize_uint8"]

DATASETS = ("digits", "shoes2bags", "cmnist", "folders")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IGAN_URL = "http://efrosgans.eecs.berkeley.edu/iGAN/datasets/"


class DataError(Exception):
    """A data set cannot be loaded (missing or malformed files); the message says what to do."""


@dataclass
class DomainData:
    """Source and target images of one data set, uint8 [N, 3, H, W] on the CPU."""

    name: str
    train_source: torch.Tensor
    train_target: torch.Tensor
    test_source: torch.Tensor
    test_target: torch.Tensor
    colored: bool = False  # hue is meaningful (colored digits)
    # For labelled data sets: images and labels of every class, train and held-out split,
    # to train the evaluation classifier on real data only; and the target's label.
    classifier_train: tuple[torch.Tensor, torch.Tensor] | None = None
    classifier_test: tuple[torch.Tensor, torch.Tensor] | None = None
    target_label: int | None = None

    @property
    def image_size(self) -> int:
        return self.train_source.shape[-1]


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] uint8 -> [N, C, size, size] uint8, antialiased bilinear."""
    if images.shape[-2:] == (size, size):
        return images
    resized = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.round().clamp(0, 255).to(torch.uint8)


def colorize(gray: torch.Tensor, hues: np.ndarray) -> torch.Tensor:
    """Gray images [N, H, W] in [0, 1] -> RGB uint8 [N, 3, H, W]: pixel value times the fully
    saturated color of the image's hue (degrees), on black (the colored-MNIST recipe)."""
    colors = torch.tensor(
        [colorsys.hsv_to_rgb(h / 360.0, 1.0, 1.0) for h in hues], dtype=torch.float32
    )  # [N, 3]
    rgb = gray[:, None, :, :] * colors[:, :, None, None]  # [N, 3, H, W]
    return (rgb * 255).round().clamp(0, 255).to(torch.uint8)


def _split_colored_digits(
    gray: torch.Tensor,
    labels: np.ndarray,
    test_gray,
    test_labels,
    source_digit: int,
    target_digit: int,
    image_size: int,
    seed: int,
    name: str,
) -> DomainData:
    rng = np.random.default_rng(seed)
    train = resize_uint8(colorize(gray, rng.uniform(0, 360, len(gray))), image_size)
    test = resize_uint8(colorize(test_gray, rng.uniform(0, 360, len(test_gray))), image_size)
    train_labels, test_labels = torch.as_tensor(labels), torch.as_tensor(test_labels)
    for option, digit in (("--source-digit", source_digit), ("--target-digit", target_digit)):
        for split, split_labels in (("train", train_labels), ("test", test_labels)):
            if not (split_labels == digit).any():
                raise DataError(
                    f"{name}: no image of class {digit} ({option}) in the {split} split"
                )
    return DomainData(
        name=name,
        train_source=train[train_labels == source_digit],
        train_target=train[train_labels == target_digit],
        test_source=test[test_labels == source_digit],
        test_target=test[test_labels == target_digit],
        colored=True,
        classifier_train=(train, train_labels),
        classifier_test=(test, test_labels),
        target_label=target_digit,
    )


def load_digits(image_size: int, source_digit: int, target_digit: int, seed: int) -> DomainData:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), upsampled to
    ``image_size``, each image given a random hue; a stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    gray = torch.tensor(digits.images / 16.0, dtype=torch.float32)  # [1797, 8, 8] in [0, 1]
    train_idx, test_idx = train_test_split(
        np.arange(len(gray)), test_size=0.2, stratify=digits.target, random_state=seed
    )
    return _split_colored_digits(
        gray[train_idx],
        digits.target[train_idx],
        gray[test_idx],
        digits.target[test_idx],
        source_digit,
        target_digit,
        image_size,
        seed,
        "digits",
    )


def load_cmnist(
    root: Path, image_size: int, source_digit: int, target_digit: int, seed: int
) -> DomainData:
    """torchvision MNIST from ``root`` (no download), colored by a random hue per image."""
    from torchvision.datasets import MNIST

    try:
        train = MNIST(str(root), train=True, download=False)
        test = MNIST(str(root), train=False, download=False)
    except RuntimeError as error:
        raise DataError(
            f"cmnist: MNIST not found under {root} ({error}). Expected torchvision's layout "
            f"{root}/MNIST/raw/train-images-idx3-ubyte (and the other three idx files); get "
            f"them with torchvision.datasets.MNIST('{root}', download=True) on a machine with "
            f"internet access, then copy the folder here."
        ) from None
    except Exception as error:  # torchvision's idx reader on empty or malformed files
        raise DataError(
            f"cmnist: the MNIST idx files under {root}/MNIST/raw cannot be read "
            f"({type(error).__name__}: {error}); they must be torchvision's MNIST files"
        ) from None
    for split, part in (("train", train), ("test", test)):
        if len(part.data) == 0 or part.data.ndim != 3 or len(part.data) != len(part.targets):
            raise DataError(
                f"cmnist: the MNIST {split} files under {root}/MNIST/raw hold no usable images "
                f"(images {tuple(part.data.shape)}, labels {tuple(part.targets.shape)})"
            )
    return _split_colored_digits(
        train.data.float() / 255,
        train.targets.numpy(),
        test.data.float() / 255,
        test.targets.numpy(),
        source_digit,
        target_digit,
        image_size,
        seed,
        "cmnist",
    )


def _read_hdf5_images(path: Path) -> torch.Tensor:
    import h5py

    try:
        with h5py.File(path, "r") as file:
            if not isinstance(file.get("imgs"), h5py.Dataset):
                raise DataError(
                    f"shoes2bags: {path} has no dataset 'imgs' (keys: {sorted(file.keys())})"
                )
            images = file["imgs"][()]
    except OSError as error:
        raise DataError(f"shoes2bags: cannot read {path} as HDF5: {error}") from None
    if (
        not isinstance(images, np.ndarray)
        or images.ndim != 4
        or images.shape[-1] != 3
        or images.dtype != np.uint8
        or min(images.shape) == 0
    ):
        raise DataError(
            f"shoes2bags: {path}['imgs'] must be uint8 (N, H, W, 3) with N >= 1, got "
            f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}"
        )
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]


def _train_test_split(images: torch.Tensor, test_fraction: float = 0.1):
    """First 90% train, last 10% test: the split of Korotin et al. (files are pre-shuffled)."""
    num_train = int(round(len(images) * (1 - test_fraction)))
    return images[:num_train], images[num_train:]


def load_shoes2bags(root: Path, image_size: int) -> DomainData:
    """The iGAN HDF5 files ``shoes_{64,128}.hdf5`` and ``handbag_{64,128}.hdf5`` in ``root``."""
    resolutions = (64, 128) if image_size <= 64 else (128, 64)
    for resolution in resolutions:
        shoes, bags = root / f"shoes_{resolution}.hdf5", root / f"handbag_{resolution}.hdf5"
        if shoes.is_file() and bags.is_file():
            break
    else:
        raise DataError(
            f"shoes2bags: expected shoes_64.hdf5 and handbag_64.hdf5 (or shoes_128.hdf5 and "
            f"handbag_128.hdf5) in {root}. They are the iGAN data sets (Zhu et al. 2016): "
            f"download shoes_64.zip and handbag_64.zip from {IGAN_URL}, unzip them into "
            f"{root}, or pass --data-root with the folder that holds them."
        )
    source_train, source_test = _train_test_split(_read_hdf5_images(shoes))
    target_train, target_test = _train_test_split(_read_hdf5_images(bags))
    splits = ((shoes, source_train, source_test), (bags, target_train, target_test))
    for path, train, test in splits:
        if len(train) == 0 or len(test) == 0:
            raise DataError(
                f"shoes2bags: {path} has {len(train) + len(test)} image(s), too few to hold out "
                f"a test split (the last 10%) and keep training images"
            )
    return DomainData(
        "shoes2bags",
        resize_uint8(source_train, image_size),
        resize_uint8(target_train, image_size),
        resize_uint8(source_test, image_size),
        resize_uint8(target_test, image_size),
    )


def _rgb8(image):
    """The image as 8-bit RGB. PIL's convert("RGB") clips 16-bit grayscale (modes "I;16",
    "I"; 16-bit PNGs load so) instead of scaling it: mid-gray 30000/65535 came out white."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        gray = np.rint(np.asarray(image, dtype=np.float64) / 257.0)  # 65535 -> 255
        return Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _read_image(file: Path, image_size: int) -> torch.Tensor:
    """One image file -> uint8 [3, image_size, image_size]: center crop, bicubic resize."""
    from PIL import Image

    with Image.open(file) as image:
        image = _rgb8(image)
        side = min(image.size)  # center crop to a square, then resize
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _read_image_folder(folder: Path, image_size: int) -> torch.Tensor:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"folders: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    images = []
    for file in files:
        if not file.is_file():  # a folder named x.png, a broken link
            kind = "a folder" if file.is_dir() else "not a readable file (a broken link?)"
            raise DataError(f"folders: {file} is {kind}; remove it from {folder}")
        try:
            images.append(_read_image(file, image_size))
        except Exception as error:  # PIL: UnidentifiedImageError, truncated data, ...
            raise DataError(
                f"folders: {file} is not a readable image ({type(error).__name__}: {error}); "
                f"remove or replace it"
            ) from None
    return torch.stack(images)  # [N, 3, image_size, image_size]


def load_folders(root: Path, image_size: int) -> DomainData:
    """Two image folders in CycleGAN's layout: ``root/trainA`` (source), ``root/trainB``
    (target), and optionally ``root/testA``, ``root/testB``; without them the last 10% of each
    train folder is held out."""
    parts = {}
    for split in ("train", "test"):
        for domain in ("A", "B"):
            folder = root / f"{split}{domain}"
            parts[split + domain] = folder if folder.is_dir() else None
    if parts["trainA"] is None or parts["trainB"] is None:
        raise DataError(
            f"folders: expected image folders {root / 'trainA'} (source) and "
            f"{root / 'trainB'} (target); testA/testB are optional"
        )
    data = {}
    for domain in ("A", "B"):
        train = _read_image_folder(parts["train" + domain], image_size)
        if parts["test" + domain] is not None:
            data[domain] = (train, _read_image_folder(parts["test" + domain], image_size))
        else:
            data[domain] = _train_test_split(train)
        if len(data[domain][0]) == 0 or len(data[domain][1]) == 0:
            raise DataError(
                f"folders: {domain} has too few images to hold out a test split (the last "
                f"10% of train{domain}) and keep training images; add images or test{domain}"
            )
    return DomainData("folders", data["A"][0], data["B"][0], data["A"][1], data["B"][1])


def load_dataset(
    name: str,
    data_root: str | Path | None,
    image_size: int,
    source_digit: int = 2,
    target_digit: int = 3,
    seed: int = 0,
) -> DomainData:
    """Loads data set ``name`` (one of :data:`DATASETS`) at ``image_size`` pixels; the file
    based ones read from ``data_root`` (default ``./data``)."""
    if name == "digits":
        return load_digits(image_size, source_digit, target_digit, seed)
    root = Path("data" if data_root is None else data_root).expanduser()
    if name == "cmnist":
        return load_cmnist(root, image_size, source_digit, target_digit, seed)
    if name == "shoes2bags":
        return load_shoes2bags(root, image_size)
    if name == "folders":
        return load_folders(root, image_size)
    raise DataError(f"--dataset must be one of {DATASETS}, got {name!r}")
