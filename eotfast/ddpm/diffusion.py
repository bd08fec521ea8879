"""Gaussian diffusion (DDPM) for a v- or noise-predicting network: schedules, the training
loss, samplers.

The network predicts v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (``prediction="v"``,
the trainer's default) or the noise eps (``prediction="eps"``); the samplers turn either into
an x_0 estimate, x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v for v.

References: Ho et al. (2020) for the forward process, the epsilon loss and the ancestral
sampler; Salimans & Ho (2022), "Progressive Distillation for Fast Sampling of Diffusion
Models", for v-prediction; Nichol & Dhariwal (2021) for the cosine schedule; Song et al.
(2021), "Denoising Diffusion Implicit Models", for the few-step DDIM sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GaussianDiffusion", "SCHEDULES", "beta_schedule", "linear_schedule_min_timesteps"]

SCHEDULES = ("linear", "cosine")
# What the network predicts. "eps": the noise (Ho et al.). "v" (TrainConfig's default):
# sqrt(ab) eps - sqrt(1 - ab) x_0 (Salimans & Ho 2022), from which x_0 follows as
# sqrt(ab) x_t - sqrt(1 - ab) v and the noise as sqrt(1 - ab) x_t + sqrt(ab) v. Its
# loss weighs x_0 errors by SNR + 1 where the noise loss weighs them by SNR, so at high noise,
# where an image's global colors are decided, it trains ~1/SNR (10-1000x) harder.
PREDICTIONS = ("eps", "v")

# A denoiser: (x_t [B, C, H, W], t [B], cond [B, C', H, W]) -> its prediction [B, C, H, W],
# v or the noise eps as GaussianDiffusion.prediction says.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def linear_schedule_min_timesteps() -> int:
    """The smallest T for which the linear schedule's last beta, 0.02 * 1000 / T, is below 1
    (at beta = 1 alpha_bar reaches 0 and the samplers divide by it)."""
    return 21


def beta_schedule(schedule: str, num_timesteps: int) -> torch.Tensor:
    """Noise variances beta_1..beta_T, float64 [T].

    "linear": beta from 1e-4 to 0.02 at T = 1000 (Ho et al.), scaled by 1000 / T so that other
    T keep the same total noise. "cosine": alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)
    with s = 0.008, betas clipped at 0.999 (Nichol & Dhariwal).
    """
    if schedule == "linear":
        if num_timesteps < linear_schedule_min_timesteps():
            raise ValueError(
                f"the linear schedule needs at least {linear_schedule_min_timesteps()} "
                f"timesteps (its last beta, 0.02 * 1000 / T, reaches 1 below that), "
                f"got {num_timesteps}"
            )
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


class GaussianDiffusion(nn.Module):
    """The forward process q(x_t | x_0), the training loss and the reverse samplers for a
    model that predicts v or the noise eps (``prediction``; the trainer passes "v").

    Images live in [-1, 1]. Timesteps are 0-based: t = 0 is the least noisy step.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,   # T, number of diffusion steps
        schedule: str = "cosine",    # beta schedule: "linear" or "cosine"
        prediction: str = "eps",     # network output: "eps" or "v" (TrainConfig's default)
    ):  # fmt: skip
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.num_timesteps = num_timesteps
        self.schedule = schedule
        self.prediction = prediction
        betas = beta_schedule(schedule, num_timesteps)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        # Computed in float64, stored in float32 (the training dtype).
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alpha_bar", alpha_bar.float(), persistent=False)

    def _gather(self, values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return values[t][:, None, None, None]  # [B] -> [B, 1, 1, 1], broadcasts over images

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        alpha_bar = self._gather(self.alpha_bar, t)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def training_loss(self, model: Denoiser, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Mean squared error between the model output and its target at uniformly drawn t:
        v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 for "v", the noise eps for "eps"."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        target = noise
        if self.prediction == "v":
            alpha_bar = self._gather(self.alpha_bar, t)
            target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
        return F.mse_loss(model(self.q_sample(x0, t, noise), t, cond), target)

    def _predict_x0(self, model: Denoiser, x_t, t, cond):
        """Model output -> clipped x_0 estimate, and the noise consistent with the clip.

        x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v for "v",
        x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) for "eps".
        """
        t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        alpha_bar = self.alpha_bar[t]
        output = model(x_t, t_batch, cond)
        if self.prediction == "v":
            x0 = alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * output
        else:
            x0 = (x_t - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()
        x0 = x0.clamp(-1, 1)
        eps = (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return x0, eps

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Denoiser,
        cond: torch.Tensor,
        num_steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM sampling on ``num_steps`` evenly spaced timesteps; eta = 0 is deterministic
        given the initial noise, eta = 1 matches DDPM's variance. Returns x_0 in [-1, 1]."""
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_timesteps}], got {num_steps}")
        shape = (cond.shape[0], self._image_channels(model, cond), *cond.shape[-2:])
        x = torch.randn(shape, generator=generator, device=cond.device, dtype=cond.dtype)
        timesteps = torch.linspace(self.num_timesteps - 1, 0, num_steps).round().long().tolist()
        for i, t in enumerate(timesteps):
            x0, eps = self._predict_x0(model, x, t, cond)
            if i == len(timesteps) - 1:
                return x0
            alpha_bar, alpha_bar_next = self.alpha_bar[t], self.alpha_bar[timesteps[i + 1]]
            sigma = (
                eta
                * ((1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)).sqrt()
            )
            x = alpha_bar_next.sqrt() * x0 + (1 - alpha_bar_next - sigma**2).sqrt() * eps
            if eta > 0:
                x = x + sigma * torch.randn(
                    x.shape, generator=generator, device=x.device, dtype=x.dtype
                )
        return x

    @torch.no_grad()
    def ancestral_sample(
        self, model: Denoiser, cond: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """DDPM ancestral sampling through all T steps (posterior variance beta-tilde)."""
        shape = (cond.shape[0], self._image_channels(model, cond), *cond.shape[-2:])
        x = torch.randn(shape, generator=generator, device=cond.device, dtype=cond.dtype)
        for t in reversed(range(self.num_timesteps)):
            x0, _ = self._predict_x0(model, x, t, cond)
            if t == 0:
                return x0
            alpha_bar, alpha_bar_prev = self.alpha_bar[t], self.alpha_bar[t - 1]
            beta = self.betas[t]
            # Posterior q(x_{t-1} | x_t, x_0): mean coefficients and variance (Ho et al. eq. 7).
            mean = (
                alpha_bar_prev.sqrt() * beta / (1 - alpha_bar) * x0
                + (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar) * x
            )
            variance = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
            x = mean + variance.sqrt() * torch.randn(
                shape, generator=generator, device=x.device, dtype=x.dtype
            )
        return x

    @staticmethod
    def _image_channels(model: Denoiser, cond: torch.Tensor) -> int:
        return getattr(model, "image_channels", cond.shape[1])
