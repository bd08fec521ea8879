"""Exponential moving average of a model's weights (evaluation uses the average)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = decay_t * ema + (1 - decay_t) * weights`` after each optimizer step, with the
    warm-up decay_t = min(decay, (1 + t) / (10 + t)) so that early weights, which are far from
    the final ones, fade fast in short runs. Buffers are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, list(model.parameters()), 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return {
            "module": self.module.state_dict(),
            "num_updates": self.num_updates,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
