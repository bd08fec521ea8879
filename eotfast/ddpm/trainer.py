"""OT-paired conditional DDPM training: configuration, the compiled step, checkpoints, and the
run loop behind ``train.py``.

Each step draws a source batch and a target batch independently, pairs them with
:func:`eotfast.pair` on the training device inside the compiled step, and trains the U-Net to
denoise the paired target conditioned on its source: by default it predicts
v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022); ``prediction="eps"``
makes it predict the noise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eotfast import available_backends, pair
from eotfast.ddpm.data import DomainData, load_dataset
from eotfast.ddpm.diffusion import GaussianDiffusion
from eotfast.ddpm.ema import EMA
from eotfast.ddpm.metrics import (
    InceptionFeatures,
    frechet_distance,
    hue_degrees,
    hue_difference,
    image_metrics,
    train_classifier,
)
from eotfast.ddpm.unet import ConditionalUNet
from eotfast.ops.registry import BACKENDS

__all__ = ["OT_CHOICES", "TrainConfig", "Trainer", "CheckpointError", "load_checkpoint"]

# --ot value -> (pair method, backend): "sinkhorn" takes the device's fastest backend, and
# sinkhorn_<name> one backend of the registry (eotfast.ops.registry.BACKENDS).
OT_CHOICES = {
    "sinkhorn": ("sinkhorn", "auto"),
    **{f"sinkhorn_{name}": ("sinkhorn", name) for name in BACKENDS},
    "exact": ("exact", "auto"),
    "emd": ("emd", "auto"),
    "random": ("random", "auto"),
}
DEFAULT_IMAGE_SIZE = {"digits": 16, "cmnist": 32, "shoes2bags": 64, "folders": 64}
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json and inside every checkpoint."""

    # fmt: off
    dataset: str = "digits"                  # digits | shoes2bags | cmnist | folders
    data_root: str | None = None             # folder of the file-based data sets (./data)
    out_dir: str | None = None               # run folder; default runs/{dataset}-{ot}
    image_size: int | None = None            # pixels; default per data set (digits: 16)
    source_digit: int = 2                    # digits / cmnist: source class
    target_digit: int = 3                    # digits / cmnist: target class
    ot: str = "sinkhorn"                     # pairing, one of OT_CHOICES
    reg: float = 0.05                        # Sinkhorn epsilon relative to std(cost)
    sampling: str = "sample"                 # partner from a plan row: sample | argmax
    steps: int = 600                         # optimizer steps of the whole run
    batch_size: int = 64                     # source (and target) images per step
    lr: float = 1e-3                         # AdamW peak learning rate
    weight_decay: float = 0.0                # AdamW weight decay
    warmup_steps: int = 100                  # linear learning-rate warm-up
    grad_clip: float = 1.0                   # max global gradient norm
    ema_decay: float = 0.995                 # EMA of the weights (used for evaluation)
    base_channels: int = 32                  # U-Net width at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 2)  # U-Net width multiplier per level
    num_res_blocks: int = 1                  # residual blocks per encoder level
    attention_levels: tuple[int, ...] = (2,)  # levels with self-attention (0 = full res)
    dropout: float = 0.0                     # dropout in residual blocks
    timesteps: int = 1000                    # diffusion steps T
    schedule: str = "cosine"                 # beta schedule: linear | cosine
    prediction: str = "v"                    # network target: v (Salimans & Ho) | eps (noise)
    sample_steps: int = 25                   # DDIM steps for evaluation samples
    eval_every: int = 0                      # steps between evaluations (0: only at the end)
    eval_size: int = 256                     # generated images per evaluation
    checkpoint_every: int = 200              # steps between checkpoints
    log_every: int = 20                      # steps between metrics-log lines
    compile: bool = True                     # torch.compile the training step
    device: str = "auto"                     # cuda if available, else cpu
    seed: int = 0                            # model init, data order, noise, pairing
    wandb: str = "disabled"                  # disabled | offline | online
    # fmt: on

    def resolved(self) -> TrainConfig:
        """Fills the per-data-set defaults (image size, output folder)."""
        config = dataclasses.replace(self)
        if config.image_size is None:
            config.image_size = DEFAULT_IMAGE_SIZE[config.dataset]
        if config.out_dir is None:
            config.out_dir = str(Path("runs") / f"{config.dataset}-{config.ot}")
        config.channel_mults = tuple(config.channel_mults)
        config.attention_levels = tuple(config.attention_levels)
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in known}
        )


class CheckpointError(Exception):
    """A checkpoint cannot be read (missing, truncated, corrupted, or not ours)."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Writes atomically: a temporary file beside the target, fsync'd, then renamed over it,
    so an interrupted write never leaves a truncated checkpoint behind."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


CHECKPOINT_KEYS = ("config", "step", "model", "ema", "optimizer", "scheduler", "rng")


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted and cannot be "
            f"read ({type(error).__name__}: {error})"
        ) from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not an eotfast training checkpoint "
            f"(missing {', '.join(missing)})"
        )
    return state


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_pairing(ot: str, device: torch.device) -> tuple[str, str, str]:
    """--ot -> (pair method, backend, the --ot value actually used). A Sinkhorn backend that
    cannot run on ``device`` falls back to sinkhorn_cpu, said in one line."""
    method, backend = OT_CHOICES[ot]
    if method == "sinkhorn" and backend != "auto":
        runnable = available_backends(device)
        if backend == "cpu" and "cpu" in available_backends("cpu"):
            return method, backend, ot  # on a GPU: pairs on host copies of the batch
        if backend not in runnable:
            print(
                f"--ot {ot}: backend {backend!r} cannot run on {device} here "
                f"(available: {', '.join(runnable)}); using sinkhorn_cpu",
                file=sys.stderr,
            )
            return method, "cpu", "sinkhorn_cpu"
    return method, backend, ot


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> [0, 1]."""
    return ((images + 1) / 2).clamp(0, 1)


class PairedDenoisingLoss(nn.Module):
    """The compiled part of a training step: pair, noise, predict, loss (backward is traced
    by AOTAutograd from this graph)."""

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        method: str,
        backend: str,
        reg: float,
        sampling: str,
    ):
        super().__init__()
        self.model, self.diffusion = model, diffusion
        self.method, self.backend, self.reg, self.sampling = method, backend, reg, sampling

    def partners(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Index j [B] pairing source[i] with target[j[i]]."""
        x, y = source.flatten(1), target.flatten(1)  # [B, C*H*W]
        if self.backend == "cpu" and x.device.type != "cpu":
            x, y = x.cpu(), y.cpu()  # the C++ solver reads host memory: an explicit choice
        j = pair(x, y, self.method, reg=self.reg, sampling=self.sampling, backend=self.backend)
        return j.to(source.device)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        partner = target[self.partners(source, target)]
        return self.diffusion.training_loss(self.model, partner, cond=source)


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs, checkpoints and evaluates it."""

    def __init__(self, config: TrainConfig, data: DomainData | None = None):
        self.config = config = config.resolved()
        self.device = resolve_device(config.device)
        self.out_dir = Path(config.out_dir)
        self.method, self.backend, self.ot_used = resolve_pairing(config.ot, self.device)

        torch.manual_seed(config.seed)
        self.data = (
            data
            if data is not None
            else load_dataset(
                config.dataset,
                config.data_root,
                config.image_size,
                config.source_digit,
                config.target_digit,
                config.seed,
            )
        )
        self.train_source = self.data.train_source.to(self.device)  # uint8 [N, 3, H, W]
        self.train_target = self.data.train_target.to(self.device)
        self.data_generator = torch.Generator().manual_seed(config.seed)

        self.model = ConditionalUNet(
            base_channels=config.base_channels,
            channel_mults=config.channel_mults,
            num_res_blocks=config.num_res_blocks,
            attention_levels=config.attention_levels,
            dropout=config.dropout,
        ).to(self.device)
        if config.image_size % self.model.downsample_factor:
            raise ValueError(
                f"--image-size must be divisible by "
                f"{self.model.downsample_factor}, got {config.image_size}"
            )
        self.ema = EMA(self.model, decay=config.ema_decay)
        self.diffusion = GaussianDiffusion(config.timesteps, config.schedule, config.prediction).to(
            self.device
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        warmup = max(config.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        self.loss_fn = PairedDenoisingLoss(
            self.model, self.diffusion, self.method, self.backend, config.reg, config.sampling
        )
        self.step_fn = (
            torch.compile(self.loss_fn, fullgraph=True) if config.compile else self.loss_fn
        )
        self.step = 0
        self._classifier = None
        # Inception features for FID on image data sets: built at the first evaluation, or
        # the message why not (weights missing), printed once.
        self._inception: nn.Module | None = None
        self._inception_missing: str | None = None

    # ----------------------------------------------------------------- training
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Independent source and target batches (uniform, with replacement), [-1, 1]."""
        size = self.config.batch_size
        source_index = torch.randint(
            len(self.train_source), (size,), generator=self.data_generator
        ).to(self.device)
        target_index = torch.randint(
            len(self.train_target), (size,), generator=self.data_generator
        ).to(self.device)
        return (
            to_model_range(self.train_source[source_index]),
            to_model_range(self.train_target[target_index]),
        )

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns the loss as a device tensor (no host sync)."""
        self.model.train()
        source, target = self.next_batch()
        loss = self.step_fn(source, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        return loss.detach()

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "data": self.data_generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        self.data_generator.set_state(state["rng"]["data"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def save(self) -> Path:
        path = self.out_dir / CHECKPOINT_NAME
        save_checkpoint(self.state_dict(), path)
        return path

    # --------------------------------------------------------------- evaluation
    def classifier(self):
        if self._classifier is None and self.data.classifier_train is not None:
            self._classifier = train_classifier(*self.data.classifier_train, seed=self.config.seed)
        return self._classifier

    @torch.no_grad()
    def evaluate(self, num_images: int | None = None) -> tuple[dict, torch.Tensor]:
        """Metrics of the EMA model on held-out sources; also returns the sample grid
        (rows of source | OT partner | generated) as a [rows*3, 3, H, W] tensor in [0, 1]."""
        config = self.config
        num_images = num_images or config.eval_size
        generator = torch.Generator(self.device).manual_seed(config.seed + 1)
        test_source, test_target = self.data.test_source, self.data.test_target
        unique_sources = test_source[:num_images]
        targets = test_target[: max(num_images, len(unique_sources))]
        # OT partners of the held-out sources among the held-out targets: exact assignment.
        partner_index = pair(
            to_model_range(unique_sources).flatten(1),
            to_model_range(targets).flatten(1),
            "exact" if len(unique_sources) <= len(targets) else "emd",
            sampling="argmax",
        )
        # Cycle through the held-out sources until num_images outputs (different noise).
        index = torch.arange(num_images) % len(unique_sources)
        sources, partners = unique_sources[index], targets[partner_index[index]]

        outputs = []
        for chunk in to_model_range(sources).to(self.device).split(max(config.batch_size, 64)):
            outputs.append(
                self.diffusion.ddim_sample(
                    self.ema.module, chunk, config.sample_steps, generator=generator
                )
            )
        outputs = to_unit_range(torch.cat(outputs).float().cpu())
        sources01, partners01 = sources.float() / 255, partners.float() / 255

        metrics = {"step": self.step, **image_metrics(outputs, sources01, partners01)}
        classifier = self.classifier()
        if classifier is not None:
            real_images, real_labels = self.data.classifier_test
            real_predictions = classifier(real_images.float() / 255).argmax(1)
            metrics["classifier_test_accuracy"] = float(
                (real_predictions == real_labels).float().mean()
            )
            metrics["target_accuracy"] = float(
                (classifier(outputs).argmax(1) == self.data.target_label).float().mean()
            )
            metrics["fid_classifier"] = frechet_distance(
                classifier.features(outputs), classifier.features(test_target.float() / 255)
            )
        else:
            metrics.update(self._inception_fid(outputs, test_target))
        if self.data.colored:
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
        features = self._inception
        real = real[: len(outputs)].float() / 255
        feature_sets = [
            torch.cat([features(chunk.to(self.device)).cpu() for chunk in images.split(64)])
            for images in (outputs, real)
        ]
        return {"fid_inception": frechet_distance(*feature_sets)}


def write_json_line(path: Path, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def save_grid(grid: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    save_image(grid, path, nrow=3, padding=1, pad_value=1.0)


def run(
    config: TrainConfig, resume: bool = False, data: DomainData | None = None, progress: bool = True
) -> dict:
    """Trains (or resumes) a run to ``config.steps`` and evaluates it; returns the final
    metrics. Interrupting (Ctrl-C) writes a checkpoint first."""
    from tqdm import tqdm

    config = config.resolved()
    out_dir = Path(config.out_dir)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    state = None
    if resume:
        state = load_checkpoint(checkpoint_path)
        saved = TrainConfig.from_dict(state["config"])
        # The saved run defines the experiment; only how long and how it executes may change.
        config = dataclasses.replace(
            saved,
            steps=config.steps,
            compile=config.compile,
            wandb=config.wandb,
            device=config.device,
            eval_every=config.eval_every,
            checkpoint_every=config.checkpoint_every,
            log_every=config.log_every,
        )
    trainer = Trainer(config, data=data)
    config = trainer.config
    if state is not None:
        trainer.load_state_dict(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "samples").mkdir(exist_ok=True)
    (out_dir / "config.json").write_text(
        json.dumps(
            {**config.to_dict(), "ot_used": trainer.ot_used, "device_used": str(trainer.device)},
            indent=2,
        )
        + "\n"
    )
    metrics_path = out_dir / "metrics.jsonl"

    wandb_run = None
    if config.wandb != "disabled":
        import wandb

        wandb_run = wandb.init(
            project="eotfast",
            config=config.to_dict(),
            mode=config.wandb,
            dir=str(out_dir),
            resume="allow",
            name=out_dir.name,
        )

    def log(record: dict) -> None:
        write_json_line(metrics_path, record)
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def evaluate_and_record() -> dict:
        metrics, grid = trainer.evaluate()
        save_grid(grid, out_dir / "samples" / f"step_{trainer.step:06d}.png")
        log({"kind": "eval", **metrics})
        return metrics

    bar = tqdm(
        total=config.steps,
        initial=trainer.step,
        disable=not progress,
        dynamic_ncols=True,
        desc=f"{config.dataset} {trainer.ot_used}",
    )
    running_loss = torch.zeros((), device=trainer.device)
    window_steps, window_start = 0, time.perf_counter()
    try:
        while trainer.step < config.steps:
            running_loss += trainer.train_step()
            window_steps += 1
            bar.update(1)
            if trainer.step % config.log_every == 0 or trainer.step == config.steps:
                loss = float(running_loss / window_steps)  # the one host read per log line
                if not math.isfinite(loss):
                    trainer.save()
                    raise FloatingPointError(f"loss became {loss} at step {trainer.step}")
                elapsed = time.perf_counter() - window_start
                log(
                    {
                        "kind": "train",
                        "step": trainer.step,
                        "loss": loss,
                        "lr": trainer.scheduler.get_last_lr()[0],
                        "steps_per_s": window_steps / elapsed,
                    }
                )
                bar.set_postfix(loss=f"{loss:.4f}")
                running_loss.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if trainer.step % config.checkpoint_every == 0:
                trainer.save()
            if (
                config.eval_every
                and trainer.step % config.eval_every == 0
                and trainer.step < config.steps
            ):
                evaluate_and_record()
    except KeyboardInterrupt:
        bar.close()
        path = trainer.save()
        print(
            f"\ninterrupted at step {trainer.step}: checkpoint written to {path}; "
            f"continue with --resume --out-dir {out_dir}",
            file=sys.stderr,
        )
        raise
    bar.close()
    trainer.save()
    metrics = evaluate_and_record()
    if wandb_run is not None:
        wandb_run.finish()
    return metrics


def evaluate_checkpoint(
    path: str | Path, num_images: int | None = None, data: DomainData | None = None
) -> dict:
    """Metrics of a saved run's EMA model (the separate evaluation command)."""
    state = load_checkpoint(path)
    config = dataclasses.replace(TrainConfig.from_dict(state["config"]), compile=False)
    trainer = Trainer(config, data=data)
    trainer.load_state_dict(state)
    metrics, grid = trainer.evaluate(num_images)
    save_grid(grid, Path(path).with_suffix(".eval.png"))
    return metrics
