"""Evaluation of a training run's EMA model on held-out sources.

:class:`Evaluator` samples translations of the held-out source images with DDIM and reports
the metrics of :mod:`eotfast.ddpm.metrics`: SSIM/PSNR against each source's OT partner among
the held-out targets, input-to-output RMSE, and, as the data set allows, the target accuracy
and classifier FID (labelled digits), the median hue error (colored digits), or Inception FID
(image data sets, when the weights are in the local torch hub cache).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from eotfast import pair
from eotfast.ddpm.data import DomainData
from eotfast.ddpm.diffusion import GaussianDiffusion
from eotfast.ddpm.metrics import (
    InceptionFeatures,
    frechet_distance,
    hue_degrees,
    hue_difference,
    image_metrics,
    train_classifier,
)

__all__ = ["Evaluator", "save_grid", "to_model_range", "to_unit_range"]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> [0, 1]."""
    return ((images + 1) / 2).clamp(0, 1)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    """Rows of source | OT partner | generated, as one PNG."""
    from torchvision.utils import save_image

    save_image(grid, path, nrow=3, padding=1, pad_value=1.0)


class Evaluator:
    """Metrics of a model on a data set's held-out images. The evaluation classifier
    (labelled data sets) and the Inception network (image data sets) are built on first use."""

    def __init__(
        self,
        data: DomainData,
        diffusion: GaussianDiffusion,
        device: torch.device,
        sample_steps: int,
        batch_size: int,
        seed: int,
    ):
        self.data, self.diffusion, self.device = data, diffusion, device
        self.sample_steps, self.batch_size, self.seed = sample_steps, batch_size, seed
        self._classifier = None
        # Inception features for FID on image data sets, or the message why not (weights
        # missing), printed once.
        self._inception: nn.Module | None = None
        self._inception_missing: str | None = None

    def classifier(self):
        if self._classifier is None and self.data.classifier_train is not None:
            self._classifier = train_classifier(*self.data.classifier_train, seed=self.seed)
        return self._classifier

    @torch.no_grad()
    def evaluate(self, model: nn.Module, num_images: int) -> tuple[dict, torch.Tensor]:
        """Metrics of ``model`` (the EMA model) on ``num_images`` translations of held-out
        sources; also returns the sample grid (rows of source | OT partner | generated) as a
        [rows*3, 3, H, W] tensor in [0, 1]."""
        data = self.data
        generator = torch.Generator(self.device).manual_seed(self.seed + 1)
        unique_sources = data.test_source[:num_images]
        targets = data.test_target[: max(num_images, len(unique_sources))]
        # OT partners of the held-out sources among the held-out targets: exact assignment.
        exact = len(unique_sources) <= len(targets)
        partner_index = pair(
            to_model_range(unique_sources),  # [N, C, H, W]: N samples
            to_model_range(targets),
            "exact" if exact else "emd",
            sampling=None if exact else "argmax",
        )
        # Cycle through the held-out sources until num_images outputs (different noise).
        index = torch.arange(num_images) % len(unique_sources)
        sources, partners = unique_sources[index], targets[partner_index[index]]

        outputs = []
        for chunk in to_model_range(sources).to(self.device).split(max(self.batch_size, 64)):
            outputs.append(
                self.diffusion.ddim_sample(model, chunk, self.sample_steps, generator=generator)
            )
        outputs = to_unit_range(torch.cat(outputs).float().cpu())
        sources01, partners01 = sources.float() / 255, partners.float() / 255

        metrics = image_metrics(outputs, sources01, partners01)
        classifier = self.classifier()
        if classifier is not None:
            real_images, real_labels = data.classifier_test
            real_predictions = classifier(real_images.float() / 255).argmax(1)
            metrics["classifier_test_accuracy"] = float(
                (real_predictions == real_labels).float().mean()
            )
            metrics["target_accuracy"] = float(
                (classifier(outputs).argmax(1) == data.target_label).float().mean()
            )
            metrics["fid_classifier"] = frechet_distance(
                classifier.features(outputs), classifier.features(data.test_target.float() / 255)
            )
        else:
            metrics.update(self._inception_fid(outputs, data.test_target))
        if data.colored:
            source_hue = hue_degrees(sources01)
            metrics["hue_error_median"] = float(
                hue_difference(source_hue, hue_degrees(outputs)).nanmedian()
            )
            metrics["partner_hue_error_median"] = float(
                hue_difference(source_hue, hue_degrees(partners01)).nanmedian()
            )
        rows = min(8, num_images)
        grid = torch.stack([sources01[:rows], partners01[:rows], outputs[:rows]], dim=1)
        return metrics, grid.flatten(0, 1)  # [rows, 3, C, H, W] -> [rows*3, C, H, W]

    def _inception_fid(self, outputs: torch.Tensor, real: torch.Tensor) -> dict:
        if self._inception is None and self._inception_missing is None:
            try:
                self._inception = InceptionFeatures().to(self.device)
            except FileNotFoundError as error:
                self._inception_missing = str(error)
                print(f"FID skipped: {error}", file=sys.stderr)
        if self._inception is None:
            return {}
        real = real[: len(outputs)].float() / 255
        if len(real) < 2:
            return {}  # a Gaussian needs two images; frechet_distance says why
        features = self._inception
        feature_sets = [
            torch.cat([features(chunk.to(self.device)).cpu() for chunk in images.split(64)])
            for images in (outputs, real)
        ]
        return {"fid_inception": frechet_distance(*feature_sets)}
