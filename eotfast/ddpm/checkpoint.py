"""Checkpoint files of a training run: atomic writes, checked reads.

A checkpoint is one ``torch.save`` dict with the keys of :data:`CHECKPOINT_KEYS`: the run's
config (a dict), the step, the model, EMA, optimizer and scheduler states, and the RNG states
that make a resumed run continue bit for bit.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

__all__ = [
    "CHECKPOINT_NAME",
    "CHECKPOINT_KEYS",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = ("config", "step", "model", "ema", "optimizer", "scheduler", "rng")


class CheckpointError(Exception):
    """A checkpoint cannot be read or used (missing, truncated, corrupted, not ours, or made
    for another model)."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Writes atomically: a temporary file beside the target, fsync'd, then renamed over it,
    so an interrupted write never leaves a truncated checkpoint behind."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict, on the CPU; :class:`CheckpointError` when it cannot be read."""
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
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"checkpoint {path} is not an eotfast training checkpoint")
    return state
