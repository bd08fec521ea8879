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
import re
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
    "DATASET_DEFAULTS",
    "DEFAULT_IMAGE_SIZE",
    "PER_DATASET_OPTIONS",
    "GROUPNORM_GROUPS",
    "flag",
    "bounds_text",
    "example_value",
    "per_dataset_text",
    "merge_for_resume",
]

# --ot value -> (pair method, backend): "auto" is pair's default (distinct targets by the
# device's fastest route), "sinkhorn" takes the device's fastest backend, and
# sinkhorn_<name> one backend of the registry (eotfast.ops.registry.BACKENDS).
OT_CHOICES = {
    "auto": ("auto", "auto"),
    "sinkhorn": ("sinkhorn", "auto"),
    **{f"sinkhorn_{name}": ("sinkhorn", name) for name in BACKENDS},
    "exact": ("exact", "auto"),
    "emd": ("emd", "auto"),
    "random": ("random", "auto"),
}
GROUPNORM_GROUPS = 8  # the U-Net's GroupNorm groups: every width must be a multiple
LABELLED_DATASETS = ("digits", "cmnist")  # classes 0..9

# Per-data-set defaults. Each option named here defaults to None in TrainConfig and resolves
# to its data set's value (TrainConfig.resolved); a value given on the command line or to
# TrainConfig always wins. The help text lists these values; checkpoints keep resolved ones.
#
# digits and cmnist: sized for 2 CPU cores (`python train.py`: 600 steps of batch 64 at
# 16x16 in 1 min 20 s, measured in the README). shoes2bags and folders: one 64 px recipe for
# one 80 GB GPU, taken from the published 64 px diffusion and translation settings:
#   DDPM       Ho et al. 2020, CIFAR-10 32 px (scripts/run_cifar.py): ch 128, mult 1,2,2,2,
#              2 res blocks, attention at 16, dropout 0.1, Adam 2e-4, batch 128, warm-up
#              5000, grad clip 1, EMA 0.9999, 800k steps, 35.7M weights (this U-Net at the
#              same settings: 35.75M). LSUN 256 px: mult 1,1,2,2,4,4, lr 2e-5, batch 64.
#   iDDPM      Nichol & Dhariwal 2021 (improved-diffusion README and script_util): 64 px
#              uses mult 1,2,3,4 and attention at 16,8; unconditional ImageNet-64: ch 128,
#              3 res blocks, lr 1e-4, batch 128, EMA 0.9999, 1.5M steps, ~100M weights;
#              class-conditional ImageNet-64: ch 192, lr 3e-4, batch 2048, 270M weights.
#   ADM        Dhariwal & Nichol 2021, ImageNet-64 (guided-diffusion model flags): ch 192,
#              3 res blocks, attention at 32,16,8, dropout 0.1, cosine schedule.
#   Palette    Saharia et al. 2022: the source image concatenated on channels (as here),
#              ADM's U-Net; removing its self-attention layers hurt.
#   NOT        Korotin et al. 2023, handbag -> shoes at 64 px from the same iGAN files:
#              batch 64, Adam 1e-4, 100k outer steps, checkpoint and FID every 2000.
#
#   option            64 px    why
#   image_size        64       the iGAN files' size; NOT's translation resolution
#   base_channels     128      DDPM and iDDPM; ADM's 192 costs 2.5x the FLOPs (265M weights)
#   channel_mults     1,2,3,4  iDDPM and ADM at 64 px: 64, 32, 16, 8 px
#   num_res_blocks    3        iDDPM and ADM ImageNet-64 (DDPM CIFAR-10: 2)
#   attention_levels  2,3      16x16 and 8x8, iDDPM's 16,8 (ADM adds 32x32 at width 192)
#   dropout           0.1      DDPM CIFAR-10 and ADM; the iGAN domains are CIFAR-10-sized
#                              (tens of thousands of images), not ImageNet-sized
#   batch_size        128      DDPM CIFAR-10 and iDDPM ImageNet-64 (NOT: 64); ADM's 2048
#                              spans many GPUs: 16x less fits one
#   lr                1e-4     iDDPM at batch 128 (its 3e-4 goes with batch 2048)
#   warmup_steps      5000     DDPM
#   ema_decay         0.9999   DDPM, iDDPM, ADM
#   steps             300000   3/8 of DDPM CIFAR-10's 800k at the same batch: one night on
#                              one H100 (6.6 to 10.5 h, the README's estimate from counted
#                              FLOPs at 25-40% of bf16 peak); iDDPM ran 1.5M
#   eval_every        10000    iDDPM's checkpoint interval: 30 evaluations in a run
#   checkpoint_every  5000     a stopped run loses at most ~10 min (~0.1 s a step)
# 116M weights (this U-Net), 238 GFLOP per image for forward + backward at 64 px.
# folders (any two image folders, 64 px) gets the same recipe.
_DIGITS_DEFAULTS = {
    "image_size": 16,
    "base_channels": 32,
    "channel_mults": (1, 2, 2),
    "num_res_blocks": 1,
    "attention_levels": (2,),
    "dropout": 0.0,
    "steps": 600,
    "batch_size": 64,
    "lr": 1e-3,
    "warmup_steps": 100,
    "ema_decay": 0.995,
    "eval_every": 0,
    "checkpoint_every": 200,
}
_IMAGES_64_DEFAULTS = {
    "image_size": 64,
    "base_channels": 128,
    "channel_mults": (1, 2, 3, 4),
    "num_res_blocks": 3,
    "attention_levels": (2, 3),
    "dropout": 0.1,
    "steps": 300_000,
    "batch_size": 128,
    "lr": 1e-4,
    "warmup_steps": 5000,
    "ema_decay": 0.9999,
    "eval_every": 10_000,
    "checkpoint_every": 5000,
}
DATASET_DEFAULTS = {
    "digits": _DIGITS_DEFAULTS,
    "cmnist": {**_DIGITS_DEFAULTS, "image_size": 32},
    "shoes2bags": _IMAGES_64_DEFAULTS,
    "folders": dict(_IMAGES_64_DEFAULTS),
}
PER_DATASET_OPTIONS = tuple(_DIGITS_DEFAULTS)
DEFAULT_IMAGE_SIZE = {name: values["image_size"] for name, values in DATASET_DEFAULTS.items()}

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
    ``default_help`` (how the help text states a default of None; the options of
    :data:`PER_DATASET_OPTIONS` state theirs from :data:`DATASET_DEFAULTS`); ``cli``
    ("negate": a --no-<name> switch)."""
    return dataclasses.field(default=default, metadata={"help": help, "resume": resume, **metadata})


def per_dataset_text(name: str) -> str:
    """How the help text states the default of a per-data-set option: "per data set: digits
    16, cmnist 32, ...", from :data:`DATASET_DEFAULTS`."""
    values = ", ".join(f"{dataset} {_text(d[name])}" for dataset, d in DATASET_DEFAULTS.items())
    return f"per data set: {values}"


def example_value(field: dataclasses.Field) -> Any:
    """A value of the field's kind, which decides its checks and command-line type: the
    default, or for a per-data-set option (default None) digits' value."""
    if field.default is None and field.name in PER_DATASET_OPTIONS:
        return DATASET_DEFAULTS["digits"][field.name]
    return field.default


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
    image_size: int | None = option(None, "pixels per side", low=8, high=512)
    source_digit: int = option(2, "digits/cmnist: source class", low=0, high=9)
    target_digit: int = option(3, "digits/cmnist: target class", low=0, high=9)
    # Pairing.
    # auto by measurement: on the digits default run over seeds 0-2, distinct targets (exact;
    # Sinkhorn + permutation) gave a median hue error of 10.5-10.6 deg against 11.1 for pairs
    # drawn from the plan, and 96.5-97.3% target accuracy against 96.2% (README).
    ot: str = option(
        "auto",
        "pairing: eotfast.pair's default (auto: distinct targets by the device's fastest "
        "route), Sinkhorn on a backend (sinkhorn: the device's fastest), exact assignment, "
        "POT's emd, or random",
        choices=tuple(OT_CHOICES),
    )
    reg: float = option(
        0.05, "Sinkhorn epsilon relative to std(cost)", low=1e-6, high=1e6, positive=True
    )
    sampling: str = option(
        "sample",
        "how --ot sinkhorn/emd take a partner from the plan: drawn from its row (sample), the "
        "row's most likely target (argmax), or distinct targets by the auction warm-started "
        "from the plan (permutation, Sinkhorn only)",
        choices=("sample", "argmax", "permutation"),
    )
    ot_scope: str = option(
        "auto",
        "under torchrun, pair each process's batch on its own (local) or the global batch "
        "gathered from every process (global); auto: global under torchrun, else local",
        choices=("auto", "local", "global"),
    )
    # Optimization.
    steps: int | None = option(
        None, "optimizer steps of the whole run", resume=RUN, low=1, high=10**9
    )
    batch_size: int | None = option(None, "source (and target) images per step", low=1, high=65536)
    lr: float | None = option(None, "AdamW peak learning rate", low=0, high=10.0, positive=True)
    weight_decay: float = option(0.0, "AdamW weight decay", low=0, high=10.0)
    warmup_steps: int | None = option(None, "linear learning-rate warm-up steps", low=0, high=10**9)
    grad_clip: float = option(1.0, "max global gradient norm", low=0, high=1e6, positive=True)
    ema_decay: float | None = option(
        None, "EMA decay of the weights (evaluation uses the EMA)", low=0, high=1, high_open=True
    )
    # Model.
    base_channels: int | None = option(
        None,
        f"U-Net width at full resolution (a multiple of {GROUPNORM_GROUPS})",
        low=8,
        high=4096,
    )
    channel_mults: tuple[int, ...] | None = option(
        None, "U-Net width multiplier per level", nonempty=True, low=1, high=64
    )
    num_res_blocks: int | None = option(None, "residual blocks per encoder level", low=1, high=16)
    attention_levels: tuple[int, ...] | None = option(
        None, "levels with self-attention (0 = full resolution); empty for none", low=0
    )
    dropout: float | None = option(
        None, "dropout in residual blocks", low=0, high=1, high_open=True
    )
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
    eval_every: int | None = option(
        None, "steps between evaluations (0: only at the end)", resume=RUN, low=0, high=10**9
    )
    eval_size: int = option(256, "generated images per evaluation", resume=RUN, low=2, high=10**6)
    checkpoint_every: int | None = option(
        None, "steps between checkpoints", resume=RUN, low=1, high=10**9
    )
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
        """Checks every value and the relations between them, the per-data-set defaults
        included (as :meth:`resolved` will fill them); raises :class:`ConfigError` naming the
        flag. Nothing here touches the disk; the trainer checks the output folder and the
        data before the first step."""
        for field in dataclasses.fields(self):
            _check_field(field, getattr(self, field.name))
        unset = self.dataset_defaults_used()
        values = {**{name: getattr(self, name) for name in PER_DATASET_OPTIONS}, **unset}
        try:
            _check_relations(self, values)
        except ConfigError as error:
            raise ConfigError(_note_defaults(str(error), self.dataset, unset)) from None
        _check_device(self.device)

    # ------------------------------------------------------------------- resolution
    def dataset_defaults_used(self) -> dict[str, Any]:
        """The per-data-set options left at None, with the values :meth:`resolved` gives
        them (those of ``dataset`` in :data:`DATASET_DEFAULTS`)."""
        defaults = DATASET_DEFAULTS[self.dataset]
        return {name: defaults[name] for name in PER_DATASET_OPTIONS if getattr(self, name) is None}

    def resolved(self) -> TrainConfig:
        """The configuration a run uses: the per-data-set options left at None take their data
        set's defaults, and the output folder its default. Values given are kept."""
        out_dir = self.out_dir or self.default_out_dir(self.dataset, self.ot)
        return dataclasses.replace(self, **self.dataset_defaults_used(), out_dir=out_dir)

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
        if new is None:  # a per-data-set option left to its default: the saved value stays
            continue
        if field.metadata["resume"] == RUN:
            values[name] = new
        elif new != old:
            ignored.append(f"{flag(name)} {_text(new)} (saved: {_text(old)})")
    return TrainConfig(**values), ignored


# ----------------------------------------------------------------------- field checks
def _check_relations(config: TrainConfig, values: dict[str, Any]) -> None:
    """The checks between options; ``values`` holds the per-data-set options as resolved."""
    base_channels, channel_mults = values["base_channels"], values["channel_mults"]
    attention_levels, image_size = values["attention_levels"], values["image_size"]
    if base_channels % GROUPNORM_GROUPS:
        raise ConfigError(
            f"--base-channels must be a multiple of {GROUPNORM_GROUPS} (the U-Net's "
            f"GroupNorm groups), got {base_channels}"
        )
    levels = len(channel_mults)
    bad = [level for level in attention_levels if level >= levels]
    if bad:
        raise ConfigError(
            f"--attention-levels must name levels of --channel-mults "
            f"({_join(channel_mults)}: 0 to {levels - 1}), got {_join(attention_levels)}"
        )
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ConfigError(
            f"--image-size must be divisible by {factor} for --channel-mults "
            f"{_join(channel_mults)}, got {image_size}"
        )
    if config.sampling == "permutation" and OT_CHOICES[config.ot][0] != "sinkhorn":
        raise ConfigError(
            f"--sampling permutation takes distinct targets from a Sinkhorn plan: use it with "
            f"--ot sinkhorn or sinkhorn_<backend>, got --ot {config.ot} (--ot exact and auto "
            f"give distinct targets themselves)"
        )
    if config.sample_steps > config.timesteps:
        raise ConfigError(
            f"--sample-steps ({config.sample_steps}) must be at most --timesteps "
            f"({config.timesteps})"
        )
    minimum = linear_schedule_min_timesteps()
    if config.schedule == "linear" and config.timesteps < minimum:
        raise ConfigError(
            f"--schedule linear needs --timesteps >= {minimum} (its betas, 0.02 * 1000 / T "
            f"at the end, reach 1 below that), got {config.timesteps}"
        )


def _note_defaults(message: str, dataset: str, unset: dict[str, Any]) -> str:
    """``message`` plus which of the flags it names took the data set's default (not given),
    so that the reader knows which one to give: still one line."""
    named = {
        name: value
        for name, value in unset.items()
        if re.search(re.escape(flag(name)) + r"(?![\w-])", message)
    }
    if not named:
        return message
    listed = " and ".join(
        f"{flag(name)} {_text(value) or '(none)'}" for name, value in named.items()
    )
    one = len(named) == 1
    return (
        f"{message} ({listed} {'is' if one else 'are'} the {dataset} default"
        f"{'' if one else 's'}; give {', '.join(flag(name) for name in named)} to change "
        f"{'it' if one else 'them'})"
    )


def _is_int_tuple(field: dataclasses.Field) -> bool:
    return isinstance(example_value(field), tuple)


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
    if value is None and field.default is None:  # resolved later (per data set, out_dir)
        return
    default = example_value(field)
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
    # int fields
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
