"""The diffusion maths (eotfast/ddpm/diffusion.py): the noise schedules against their closed
forms, the samplers against exact denoisers of known data, and the v-prediction target."""

import numpy as np
import pytest
import torch

from eotfast.ddpm.diffusion import GaussianDiffusion, beta_schedule
from eotfast.ddpm.trainer import TrainConfig


def test_schedules_match_their_closed_forms():
    linear = torch.cumprod(1 - beta_schedule("linear", 1000), 0)
    assert linear[-1].item() == pytest.approx(4.04e-5, rel=0.02)  # Ho et al.'s alpha_bar_T
    cosine = torch.cumprod(1 - beta_schedule("cosine", 1000), 0)
    t = torch.tensor([100, 500, 900], dtype=torch.float64)
    f = torch.cos((t / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2
    expected = f / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    assert torch.allclose(cosine[t.long() - 1], expected, rtol=1e-6)


def test_linear_schedule_needs_21_timesteps():
    with pytest.raises(ValueError, match="at least 21"):
        beta_schedule("linear", 20)
    assert beta_schedule("linear", 21).max() < 1
    assert torch.isfinite(GaussianDiffusion(21, "linear").alpha_bar).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_recover_data_with_the_exact_denoiser(schedule):
    # Data = one point c: the exact noise prediction is (x_t - sqrt(ab) c) / sqrt(1 - ab),
    # and both samplers must then return c (up to float32 rounding).
    diffusion = GaussianDiffusion(200, schedule)
    c = torch.rand(2, 3, 4, 4) * 1.6 - 0.8

    def exact_denoiser(x_t, t, cond):
        alpha_bar = diffusion.alpha_bar[t][:, None, None, None]
        return (x_t - alpha_bar.sqrt() * c) / (1 - alpha_bar).sqrt()

    cond = torch.zeros(2, 3, 4, 4)
    for sample in (diffusion.ddim_sample(exact_denoiser, cond, num_steps=10),
                   diffusion.ddim_sample(exact_denoiser, cond, num_steps=10, eta=1.0),
                   diffusion.ancestral_sample(exact_denoiser, cond)):  # fmt: skip
        assert torch.allclose(sample, c, atol=1e-4)


def trainer_diffusion(**overrides) -> GaussianDiffusion:
    """The diffusion as Trainer builds it from a TrainConfig (prediction "v" by default)."""
    config = TrainConfig(**overrides)
    diffusion = GaussianDiffusion(config.timesteps, config.schedule, config.prediction)
    assert diffusion.prediction == "v"
    return diffusion


def exact_v_model(diffusion, posterior_mean_x0):
    """v*(x_t, t) = sqrt(ab) eps_hat - sqrt(1 - ab) x0_hat, from the exact posterior mean
    x0_hat = E[x_0 | x_t] and eps_hat = E[eps | x_t] = (x_t - sqrt(ab) x0_hat) / sqrt(1 - ab)."""

    def model(x_t, t, cond):
        alpha_bar = diffusion.alpha_bar[t][:, None, None, None]
        a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x0_hat = posterior_mean_x0(x_t, a, b)
        eps_hat = (x_t - a * x0_hat) / b
        return a * eps_hat - b * x0_hat

    return model


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_prediction_samplers_recover_a_point_with_the_exact_model(schedule, tiny):
    # Data = one point c, so E[x_0 | x_t] = c. Given the exact v, every sampler must return c
    # up to float32 rounding (~1e-7, atol 1e-5). Read as noise instead, the same output gives
    # x_0 = c / a + (1 - a) / a x_t: wrong by ~1 after one DDIM step from t = T - 1, and by
    # ~1.5e-3 after the last step at t = 0 with T = 50 (the tiny trainer configuration).
    diffusion = trainer_diffusion(schedule=schedule, timesteps=tiny["timesteps"])
    c = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    model = exact_v_model(diffusion, lambda x_t, a, b: c.expand_as(x_t))
    cond = torch.zeros(2, 3, 4, 4)
    steps = TrainConfig().sample_steps
    for sample in (diffusion.ddim_sample(model, cond, num_steps=1),
                   diffusion.ddim_sample(model, cond, num_steps=steps),
                   diffusion.ddim_sample(model, cond, num_steps=steps, eta=1.0),
                   diffusion.ancestral_sample(model, cond)):  # fmt: skip
        assert torch.allclose(sample, c, atol=1e-5)


def test_v_prediction_samplers_reproduce_a_gaussian_with_the_exact_model():
    # Data = N(mu, s^2) per pixel (mu per channel). With x_t = a x_0 + b eps and
    # var_t = a^2 s^2 + b^2: E[x_0 | x_t] = mu + a s^2 (x_t - a mu) / var_t. Unlike a point,
    # this checks how the samplers carry the spread: the noise they re-add and keep.
    diffusion = trainer_diffusion()  # cosine, T = 1000
    mu, s = torch.tensor([0.25, -0.15])[None, :, None, None], 0.2  # clip at 1 is 3.5 s away
    model = exact_v_model(
        diffusion, lambda x_t, a, b: mu + a * s**2 * (x_t - a * mu) / (a**2 * s**2 + b**2)
    )
    # 2 x 16384 samples per channel; tensors of <= 32768 elements stay on one thread, which
    # keeps the 3000 sampler steps at ~1 s on a loaded 2-core machine.
    cond = torch.zeros(64, 2, 16, 16)
    T = diffusion.num_timesteps
    samplers = {
        "ddim": lambda g: diffusion.ddim_sample(model, cond, num_steps=T, generator=g),
        "ddim eta=1": lambda g: diffusion.ddim_sample(model, cond, T, eta=1.0, generator=g),
        "ancestral": lambda g: diffusion.ancestral_sample(model, cond, generator=g),
    }
    for name, sampler in samplers.items():
        sample = torch.cat([sampler(torch.Generator().manual_seed(seed)) for seed in (1, 2)])
        mean, std = sample.mean(dim=(0, 2, 3)), sample.std(dim=(0, 2, 3))
        # Sampling error: mean 0.2 / sqrt(32768) = 0.0011, std 1 / sqrt(2 * 32768) = 0.4 % of
        # s. Bias, from pushing the Gaussian through each sampler's linear steps exactly: mean
        # < 1e-4, std 0.4 % (DDIM) and 1 % (eta = 1, ancestral) low, as the last step returns
        # E[x_0 | x_t], not a draw. Hence atol 0.006 (5 sampling errors) on the mean and rtol 3 %
        # (1 % + 5 sampling errors) on the std; 25 DDIM steps (13 % low), a sampler reading v
        # as eps, or one dropping its fresh noise fails.
        assert torch.allclose(mean, mu.flatten(), atol=0.006), (name, mean)
        assert torch.allclose(std, torch.full_like(std, s), rtol=0.03), (name, std)


def test_v_prediction_target_is_its_closed_form():
    # The loss's target must be v = sqrt(ab) eps - sqrt(1 - ab) x_0 for the eps and t it drew.
    # The model sees (x_t, t), from which eps = (x_t - sqrt(ab) x_0) / sqrt(1 - ab) follows.
    diffusion = trainer_diffusion()
    torch.manual_seed(0)  # x0, and the t and eps the loss draws
    x0 = torch.rand(256, 1, 4, 4) * 2 - 1
    seen = {}

    def model(x_t, t, cond):
        ab = diffusion.alpha_bar[t].double()[:, None, None, None]
        eps = (x_t.double() - ab.sqrt() * x0.double()) / (1 - ab).sqrt()
        seen["t"], seen["v"] = t, ab.sqrt() * eps - (1 - ab).sqrt() * x0.double()
        return seen["v"].float() + seen.get("offset", 0.0)

    assert diffusion.training_loss(model, x0, cond=x0).item() < 1e-8
    assert seen["t"].min() < 100 and seen["t"].max() >= 900  # t spans the schedule
    # An output off by 0.1 everywhere costs exactly 0.1^2: the loss is a plain MSE to v.
    seen["offset"] = 0.1
    assert diffusion.training_loss(model, x0, cond=x0).item() == pytest.approx(0.01, rel=1e-3)
