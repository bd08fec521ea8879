"""The trainer's options: :class:`TrainConfig`, the one place where each option is declared.

Every field carries its help text, its allowed values and what ``--resume`` does with it
(``dataclasses.field(metadata=...)``); ``train.py`` builds its command line from the fields,
and :meth:`TrainConfig.validate` (run on construction) checks every value, so the Python API
and the command line reject the same inputs with the same one-line messages, which name the
command-line flag.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eotfast.ddpm.data import DATASETS
from eotfast.ddpm.diffusion import PREDICTIONS, SCHEDULES, linear_schedule_min_timesteps
from eotfast.ops.registry import BACKENDS

__all__ = [
    "ConfigError",
    "TrainConfig",
    "OT_CHOICES",
    "DEFAULT_IMAGE_SIZE",
    "GROUPNORM_GROUPS",
    "flag",
    "bounds_text",
    "merge_for_resume",
]

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
GROUPNORM_GROUPS = 8  # the U-Net's GroupNorm groups: every width must be a multiple
LABELLED_DATASETS = ("digits", "cmnist")  # classes 0..9

# What --resume does with a flag: "run" options (how long, how it executes, how it is
# observed) take the new value; "experiment" options (data, model, optimizer, diffusion,
# pairing, seed) keep the checkpoint's, since the saved weights and optimizer state were made
# with them; a new value given for one of those is reported and ignored.
RUN, EXPERIMENT = "run", "experiment"


class ConfigError(ValueError):
    """An option value the trainer cannot use; the message names the command-line flag."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option(default: Any, help: str, *, resume: str = EXPERIMENT, **metadata: Any):
    """A TrainConfig field. ``metadata`` keys: ``choices``; ``low``/``high`` (inclusive
    bounds), ``high_open`` (exclusive upper bound); ``positive`` (> 0); ``nonempty``;
    ``default_help`` (how the help text states a default of None); ``cli`` ("negate": a
    --no-<name> switch)."""
    return dataclasses.field(default=default, metadata={"help": help, "resume": resume, **metadata})


def _image_size_default_help() -> str:
    sizes = ", ".join(f"{name} {size}" for name, size in DEFAULT_IMAGE_SIZE.items())
    return f"per data set: {sizes}"


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json and inside every checkpoint.

    Constructing one validates it (:class:`ConfigError` on the first unusable value)."""

    # Data.
    dataset: str = option("digits", "data set", choices=DATASETS)
    data_root: str | None = option(
        None, "folder with the data set's files", resume=RUN, default_help="./data", nonempty=True
    )
    out_dir: str | None = option(
        None, "run folder", resume=RUN, default_help="runs/{dataset}-{ot}", nonempty=True
    )
    image_size: int | None = option(
        None, "pixels per side", low=8, high=512, default_help=_image_size_default_help()
    )
    source_digit: int = option(2, "digits/cmnist: source class", low=0, high=9)
    target_digit: int = option(3, "digits/cmnist: target class", low=0, high=9)
    # Pairing.
    ot: str = option(
        "sinkhorn",
        "pairing: Sinkhorn on a backend (sinkhorn: the device's fastest), exact assignment, "
        "POT's emd, or random",
        choices=tuple(OT_CHOICES),
    )
    reg: float = option(
        0.05, "Sinkhorn epsilon relative to std(cost)", low=1e-6, high=1e6, positive=True
    )
    sampling: str = option("sample", "partner from a plan row", choices=("sample", "argmax"))
    ot_scope: str = option(
        "auto",
        "under torchrun, pair each process's batch on its own (local) or the global batch "
        "gathered from every process (global); auto: global under torchrun, else local",
        choices=("auto", "local", "global"),
    )
    # Optimization.
    steps: int = option(600, "optimizer steps of the whole run", resume=RUN, low=1, high=10**9)
    batch_size: int = option(64, "source (and target) images per step", low=1, high=65536)
    lr: float = option(1e-3, "AdamW peak learning rate", low=0, high=10.0, positive=True)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0, high=10.0)
    warmup_steps: int = option(100, "linear learning-rate warm-up steps", low=0, high=10**9)
    grad_clip: float = option(1.0, "max global gradient norm", low=0, high=1e6, positive=True)
    ema_decay: float = option(
        0.995, "EMA decay of the weights (evaluation uses the EMA)", low=0, high=1, high_open=True
    )
    # Model.
    base_channels: int = option(
        32, f"U-Net width at full resolution (a multiple of {GROUPNORM_GROUPS})", low=8, high=4096
    )
    channel_mults: tuple[int, ...] = option(
        (1, 2, 2), "U-Net width multiplier per level", nonempty=True, low=1, high=64
    )
    num_res_blocks: int = option(1, "residual blocks per encoder level", low=1, high=16)
    attention_levels: tuple[int, ...] = option(
        (2,), "levels with self-attention (0 = full resolution); empty for none", low=0
    )
    dropout: float = option(0.0, "dropout in residual blocks", low=0, high=1, high_open=True)
    # Diffusion.
    timesteps: int = option(1000, "diffusion steps T", low=1, high=100_000)
    schedule: str = option("cosine", "beta schedule", choices=SCHEDULES)
    prediction: str = option(
        "v", "network target: v (Salimans & Ho 2022) or eps (the noise)", choices=PREDICTIONS
    )
    # Evaluation, logging, checkpoints.
    sample_steps: int = option(
        25, "DDIM steps for evaluation samples (at most --timesteps)", resume=RUN, low=1
    )
    eval_every: int = option(
        0, "steps between evaluations (0: only at the end)", resume=RUN, low=0, high=10**9
    )
    eval_size: int = option(256, "generated images per evaluation", resume=RUN, low=2, high=10**6)
    checkpoint_every: int = option(200, "steps between checkpoints", resume=RUN, low=1, high=10**9)
    log_every: int = option(20, "steps between metrics-log lines", resume=RUN, low=1, high=10**9)
    # Execution.
    compile: bool = option(True, "torch.compile the training step", resume=RUN, cli="negate")
    device: str = option("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)", resume=RUN)
    precision: str = option(
        "auto",
        "U-Net arithmetic: fp32, or bf16 autocast (pairing and loss stay fp32); auto: bf16 on "
        "GPUs that support it, fp32 on the CPU",
        resume=RUN,
        choices=("auto", "fp32", "bf16"),
    )
    seed: int = option(0, "model init, data order, noise, pairing", low=0, high=2**32 - 1)
    wandb: str = option(
        "disabled",
        "Weights & Biases logging",
        resume=RUN,
        choices=("disabled", "offline", "online"),
    )

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # lists from JSON, or any sequence
            value = getattr(self, field.name)
            if _is_int_tuple(field) and isinstance(value, list | tuple):
                setattr(self, field.name, tuple(value))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Checks every value and the relations between them; raises :class:`ConfigError`
        naming the flag. Nothing here touches the disk; the trainer checks the output folder
        and the data before the first step."""
        for field in dataclasses.fields(self):
            _check_field(field, getattr(self, field.name))
        if self.base_channels % GROUPNORM_GROUPS:
            raise ConfigError(
                f"--base-channels must be a multiple of {GROUPNORM_GROUPS} (the U-Net's "
                f"GroupNorm groups), got {self.base_channels}"
            )
        levels = len(self.channel_mults)
        bad = [level for level in self.attention_levels if level >= levels]
        if bad:
            raise ConfigError(
                f"--attention-levels must name levels of --channel-mults "
                f"({_join(self.channel_mults)}: 0 to {levels - 1}), "
                f"got {_join(self.attention_levels)}"
            )
        factor = 2 ** (levels - 1)
        if self.image_size is not None and self.image_size % factor:
            raise ConfigError(
                f"--image-size must be divisible by {factor} for --channel-mults "
                f"{_join(self.channel_mults)}, got {self.image_size}"
            )
        if self.sample_steps > self.timesteps:
            raise ConfigError(
                f"--sample-steps ({self.sample_steps}) must be at most --timesteps "
                f"({self.timesteps})"
            )
        minimum = linear_schedule_min_timesteps()
        if self.schedule == "linear" and self.timesteps < minimum:
            raise ConfigError(
                f"--schedule linear needs --timesteps >= {minimum} (its betas, 0.02 * 1000 / T "
                f"at the end, reach 1 below that), got {self.timesteps}"
            )
        _check_device(self.device)

    # ------------------------------------------------------------------- resolution
    def resolved(self) -> TrainConfig:
        """Fills the per-data-set defaults (image size, output folder)."""
        config = dataclasses.replace(self)
        if config.image_size is None:
            config.image_size = DEFAULT_IMAGE_SIZE[config.dataset]
            factor = 2 ** (len(config.channel_mults) - 1)
            if config.image_size % factor:
                raise ConfigError(
                    f"--channel-mults {_join(config.channel_mults)} needs an image size "
                    f"divisible by {factor}; {config.dataset}'s default is "
                    f"{config.image_size}: give --image-size"
                )
        if config.out_dir is None:
            config.out_dir = self.default_out_dir(config.dataset, config.ot)
        return config

    @staticmethod
    def default_out_dir(dataset: str, ot: str) -> str:
        return str(Path("runs") / f"{dataset}-{ot}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def non_default_fields(self) -> set[str]:
        """Names of the fields whose value differs from the default."""
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


def merge_for_resume(
    saved: dict, given: TrainConfig, given_names: set[str]
) -> tuple[TrainConfig, list[str]]:
    """The configuration a resumed run continues with: the saved values (``saved``, the
    checkpoint's config dict), with the ``run`` options named in ``given_names`` taken from
    ``given``. Returns it and the ignored ``experiment`` flags (given with a value other than
    the saved one) as ``--flag value (saved: value)`` texts."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k in known}
    ignored = []
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        if name not in given_names:
            continue
        new, old = getattr(given, name), values.get(name, field.default)
        if field.metadata["resume"] == RUN:
            values[name] = new
        elif new is not None and new != old:
            ignored.append(f"{flag(name)} {_text(new)} (saved: {_text(old)})")
    return TrainConfig(**values), ignored


# ----------------------------------------------------------------------- field checks
def _is_int_tuple(field: dataclasses.Field) -> bool:
    return isinstance(field.default, tuple)


def _join(values) -> str:
    return ",".join(str(v) for v in values)


def _text(value) -> str:
    return _join(value) if isinstance(value, tuple) else str(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_field(field: dataclasses.Field, value: Any) -> None:
    meta, name = field.metadata, flag(field.name)
    default = field.default
    if value is None and default is None:
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}")
        return
    if isinstance(default, str) or (default is None and field.type.startswith("str")):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        if meta.get("nonempty") and not value.strip():
            raise ConfigError(f"{name} must not be empty")
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return
    if isinstance(default, tuple):
        if not isinstance(value, tuple) or not all(_is_int(v) for v in value):
            raise ConfigError(f"{name} must be comma-separated integers, got {value!r}")
        if meta.get("nonempty") and not value:
            raise ConfigError(f"{name} must name at least one level, got nothing")
        for item in value:
            _check_bounds(name, item, meta, noun="every entry")
        if len(set(value)) != len(value) and field.name == "attention_levels":
            raise ConfigError(f"{name} lists a level twice: {_join(value)}")
        return
    if isinstance(default, float):
        if not _is_real(value) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if meta.get("positive") and not value > 0:
            raise ConfigError(f"{name} must be a positive number, got {value}")
        _check_bounds(name, value, meta)
        return
    # int fields (image_size's default is None)
    if not _is_int(value):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    low = meta.get("low")
    if low == 1 and value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value}")
    if low == 0 and value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    _check_bounds(name, value, meta)


def bounds_text(meta) -> str | None:
    """A field's allowed range as "[low, high]" (or "[low, high)"), None without bounds."""
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return None
    low_text = "-inf" if low is None else f"{low:g}" if isinstance(low, float) else low
    high_text = "inf" if high is None else f"{high:g}" if isinstance(high, float) else high
    return f"[{low_text}, {high_text}{')' if meta.get('high_open') else ']'}"


def _check_bounds(name: str, value, meta, noun: str = "") -> None:
    low, high, high_open = meta.get("low"), meta.get("high"), meta.get("high_open", False)
    subject = f"{name} ({noun})" if noun else name
    above = high is not None and (value >= high if high_open else value > high)
    if (low is not None and value < low) or above:
        raise ConfigError(f"{subject} must be in {bounds_text(meta)}, got {value}")


def _check_device(name: str) -> None:
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
