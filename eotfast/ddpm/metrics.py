"""Evaluation of a translation model: faithfulness to the OT partner and the input, target
domain membership, color preservation, and FID.

- SSIM and PSNR against the OT partner (exact assignment between held-out source and target
  images; higher is better), from torchmetrics.
- Input-to-output RMSE (how much of the input the output keeps).
- Target accuracy: the share of outputs that a classifier trained on real images only
  (labelled data sets: digits, cmnist) assigns to the target class.
- Hue error (colored digits): circular difference between the input's and the output's hue.
- FID: Frechet distance between Gaussians fitted to features of outputs and of real held-out
  targets, computed by torchmetrics (in torch, float64); features of the digit classifier, or
  of pytorch-fid's Inception network when its weights are in the local torch hub cache
  (nothing is downloaded).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "hue_degrees",
    "hue_difference",
    "DigitClassifier",
    "train_classifier",
    "frechet_distance",
    "InceptionFeatures",
    "inception_weights_path",
    "image_metrics",
]


def hue_degrees(images: torch.Tensor) -> torch.Tensor:
    """Hue of each RGB image [N, 3, H, W] in [0, 1], degrees in [0, 360): the circular mean of
    the pixels' HSV hues, weighted by chroma (max - min), so black background and gray pixels,
    which have no hue, do not count. NaN for an image without any chromatic pixel."""
    r, g, b = images.unbind(dim=1)
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    safe = chroma.clamp_min(1e-12)
    # HSV hue (sextant formula), in units of 60 degrees.
    sextant = torch.where(
        value == r,
        ((g - b) / safe) % 6,
        torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    angle = sextant * (math.pi / 3)
    x = (chroma * angle.cos()).sum(dim=(-2, -1))
    y = (chroma * angle.sin()).sum(dim=(-2, -1))
    hue = torch.rad2deg(torch.atan2(y, x)) % 360
    return torch.where(chroma.sum(dim=(-2, -1)) > 0, hue, torch.nan)


def hue_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Circular absolute difference of hues in degrees, in [0, 180]."""
    difference = (a - b).abs() % 360
    return torch.minimum(difference, 360 - difference)


class DigitClassifier(nn.Module):
    """Small CNN on the value channel (max over RGB), so a digit's color does not matter."""

    def __init__(
        self,
        num_classes: int = 10,   # output classes
        width: int = 32,         # channels of the first conv; the second has 2x
        feature_dim: int = 64,   # penultimate features (used for FID)
    ):  # fmt: skip
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, feature_dim]."""
        return self.body(images.amax(dim=1, keepdim=True) * 2 - 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


_CLASSIFIERS: dict[tuple, DigitClassifier] = {}


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 400,
    batch_size: int = 128,
    seed: int = 0,
) -> DigitClassifier:
    """Trains a :class:`DigitClassifier` on real uint8 images [N, 3, H, W] (CPU, ~5 s on
    digits), with small random shifts so that it judges shape, not position. Deterministic
    for a seed, so one process trains it once per data set (evaluations reuse it)."""
    key = (tuple(images.shape), int(images.sum()), int(labels.sum()), steps, batch_size, seed)
    if key not in _CLASSIFIERS:
        _CLASSIFIERS[key] = _train_classifier(images, labels, steps, batch_size, seed)
    return _CLASSIFIERS[key]


def _train_classifier(images, labels, steps, batch_size, seed) -> DigitClassifier:
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # callers may be in no_grad
        torch.manual_seed(seed)
        classifier = DigitClassifier(num_classes=int(labels.max()) + 1)
        optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
        data = images.float() / 255
        for _ in range(steps):
            index = torch.randint(len(data), (batch_size,), generator=generator)
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            batch = torch.roll(data[index], shifts=shift, dims=(-2, -1))
            loss = F.cross_entropy(classifier(batch), labels[index].long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return classifier.eval().requires_grad_(False)


class _GivenFeatures(nn.Module):
    """The identity on features [N, D]: lets torchmetrics' FrechetInceptionDistance take
    features computed elsewhere (it calls its feature module on what ``update`` gets)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (N >= 2 each):
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), by torchmetrics'
    FrechetInceptionDistance in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError(
            f"the Frechet distance needs at least 2 feature vectors per set, got "
            f"{len(features_a)} and {len(features_b)}"
        )
    # sync_on_compute=False: the features are this process's (under torchrun, rank 0
    # evaluates alone), so no collective with the other processes.
    metric = FrechetInceptionDistance(
        feature=_GivenFeatures(features_a.shape[1]), sync_on_compute=False
    )
    metric.update(features_a.detach().double().cpu(), real=False)
    metric.update(features_b.detach().double().cpu(), real=True)
    return float(metric.compute())


def inception_weights_path() -> Path:
    """Where pytorch-fid's Inception weights must be for FID on image data sets."""
    from pytorch_fid.inception import FID_WEIGHTS_URL

    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[-1]


class InceptionFeatures(nn.Module):
    """pytorch-fid's Inception-v3 pool features [N, 2048] of images [N, 3, H, W] in [0, 1],
    from the local torch hub cache (raises FileNotFoundError, never downloads)."""

    def __init__(self):
        super().__init__()
        path = inception_weights_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"FID needs pytorch-fid's Inception weights at {path}; copy "
                f"{path.name} there (it is downloaded by pytorch-fid on a machine with "
                f"internet access) to get FID for image data sets"
            )
        from pytorch_fid.inception import InceptionV3

        self.network = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)[0].flatten(1)


@torch.no_grad()
def image_metrics(
    outputs: torch.Tensor, sources: torch.Tensor, partners: torch.Tensor
) -> dict[str, float]:
    """SSIM and PSNR of outputs against their OT partners and input-to-output RMSE; images
    [N, 3, H, W] in [0, 1]."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    psnr = peak_signal_noise_ratio(
        outputs, partners, data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean"
    )
    # SSIM's default 11-pixel Gaussian window needs images of at least 11 pixels.
    kernel = min(11, outputs.shape[-1] - (1 - outputs.shape[-1] % 2))
    ssim = structural_similarity_index_measure(
        outputs, partners, data_range=1.0, kernel_size=kernel
    )
    rmse = (outputs - sources).pow(2).mean(dim=(1, 2, 3)).sqrt().mean()
    return {"psnr": float(psnr), "ssim": float(ssim), "input_output_rmse": float(rmse)}
