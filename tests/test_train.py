"""The trainer (train.py, eotfast/ddpm): data sets, samplers, the compiled step, checkpoints,
resume, evaluation and the command line's error paths. Tiny configurations, CPU only."""

import colorsys
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eotfast.ddpm.data import DataError, load_dataset
from eotfast.ddpm.diffusion import GaussianDiffusion, beta_schedule
from eotfast.ddpm.metrics import hue_degrees, hue_difference
from eotfast.ddpm.trainer import CheckpointError, TrainConfig, Trainer, load_checkpoint, run

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train.py"

# Small enough for a few seconds per run on 2 cores.
TINY = dict(
    steps=3, batch_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
    attention_levels=(1,), image_size=16, eval_size=8, sample_steps=2, checkpoint_every=2,
    log_every=1, compile=False, timesteps=50,
)  # fmt: skip


def tiny_config(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(tmp_path / "run"), **overrides})


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(TRAIN_PY), *args], capture_output=True, text=True,
        timeout=timeout, cwd=REPO,
    )  # fmt: skip


def train_losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


# --------------------------------------------------------------------------- data sets
def write_hdf5(path: Path, count: int, size: int, seed: int) -> None:
    h5py = pytest.importorskip("h5py")
    images = np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)
    with h5py.File(path, "w") as file:
        file.create_dataset("imgs", data=images)


def write_image_folder(folder: Path, count: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(count):  # non-square on purpose: the loader center-crops
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), np.uint8)).save(folder / f"{k}.png")


def write_mnist_idx(root: Path, count: int) -> None:
    """Synthetic MNIST in torchvision's raw layout (idx files), digits 0..9 cycling."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (count, 28, 28), np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, count) + labels.tobytes())  # fmt: skip


def test_digits_are_colored_split_and_uint8():
    data = load_dataset("digits", None, image_size=16, source_digit=2, target_digit=3)
    assert data.train_source.dtype == torch.uint8 and data.train_source.shape[1:] == (3, 16, 16)
    # scikit-learn's digits: 177 twos and 183 threes; 20% of each held out (stratified).
    assert len(data.train_source) + len(data.test_source) == 177
    assert len(data.train_target) + len(data.test_target) == 183
    assert abs(len(data.test_source) - 0.2 * 177) <= 1
    hues = hue_degrees(data.train_source.float() / 255)
    assert torch.isfinite(hues).all() and hues.std() > 60  # spread over the color circle


def test_hue_degrees_matches_colorsys():
    hues = torch.rand(50) * 360
    colors = torch.tensor([colorsys.hsv_to_rgb(h / 360, 0.8, 0.9) for h in hues.tolist()])
    images = colors[:, :, None, None].expand(50, 3, 4, 4) * torch.rand(50, 1, 4, 4)
    assert hue_difference(hue_degrees(images), hues).max() < 0.1
    assert torch.isnan(hue_degrees(torch.zeros(1, 3, 4, 4))).all()  # black has no hue


@pytest.mark.parametrize("kind", ["shoes2bags", "folders", "cmnist"])
def test_few_training_steps_on_each_file_dataset(tmp_path, kind):
    root = tmp_path / "data"
    root.mkdir()
    if kind == "shoes2bags":
        write_hdf5(root / "shoes_64.hdf5", 30, 64, seed=0)
        write_hdf5(root / "handbag_64.hdf5", 40, 64, seed=1)
    elif kind == "folders":
        write_image_folder(root / "trainA", 12, seed=0)
        write_image_folder(root / "trainB", 14, seed=1)
    else:
        write_mnist_idx(root, 60)
    metrics = run(tiny_config(tmp_path, dataset=kind, data_root=str(root)), progress=False)
    out = tmp_path / "run"
    assert {"psnr", "ssim", "input_output_rmse"} <= metrics.keys()
    assert all(np.isfinite(v) for v in metrics.values())
    assert (kind == "cmnist") == ("target_accuracy" in metrics and "hue_error_median" in metrics)
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert (out / "checkpoint.pt").is_file() and (out / "config.json").is_file()
    assert (out / "samples" / "step_000003.png").is_file()


def test_digits_run_reports_every_metric(tmp_path):
    metrics = run(tiny_config(tmp_path, ot="exact"), progress=False)
    expected = {
        "psnr",
        "ssim",
        "input_output_rmse",
        "target_accuracy",
        "fid_classifier",
        "hue_error_median",
        "classifier_test_accuracy",
        "partner_hue_error_median",
    }
    assert expected <= metrics.keys()
    # The classifier is trained on real digits only; it must be good on held-out real ones.
    assert metrics["classifier_test_accuracy"] > 0.9
    # Exact OT pairs held-out twos with threes of similar hue; random partners would be ~90.
    assert metrics["partner_hue_error_median"] < 45


# --------------------------------------------------------------------- diffusion maths
def test_schedules_match_their_closed_forms():
    linear = torch.cumprod(1 - beta_schedule("linear", 1000), 0)
    assert linear[-1].item() == pytest.approx(4.04e-5, rel=0.02)  # Ho et al.'s alpha_bar_T
    cosine = torch.cumprod(1 - beta_schedule("cosine", 1000), 0)
    t = torch.tensor([100, 500, 900], dtype=torch.float64)
    f = torch.cos((t / 1000 + 0.008) / 1.008 * torch.pi / 2) ** 2
    expected = f / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    assert torch.allclose(cosine[t.long() - 1], expected, rtol=1e-6)


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
def test_v_prediction_samplers_recover_a_point_with_the_exact_model(schedule):
    # Data = one point c, so E[x_0 | x_t] = c. Given the exact v, every sampler must return c
    # up to float32 rounding (~1e-7, atol 1e-5). Read as noise instead, the same output gives
    # x_0 = c / a + (1 - a) / a x_t: wrong by ~1 after one DDIM step from t = T - 1, and by
    # ~1.5e-3 after the last step at t = 0 with T = 50 (the tiny trainer configuration).
    diffusion = trainer_diffusion(schedule=schedule, timesteps=TINY["timesteps"])
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


# ------------------------------------------------------------------------ the step
def test_compiled_step_matches_eager_and_has_no_graph_break(tmp_path):
    config = tiny_config(tmp_path, compile=False)
    trainer = Trainer(config)
    source, target = trainer.next_batch()
    explanation = torch._dynamo.explain(trainer.loss_fn)(source, target)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    def loss_and_grads(fn):
        torch.manual_seed(123)
        trainer.model.zero_grad()
        loss = fn(source, target)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]

    eager_loss, eager_grads = loss_and_grads(trainer.loss_fn)
    # fallback_random: the compiled graph draws from torch's generator as eager does.
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(trainer.loss_fn, fullgraph=True)
        compiled_loss, compiled_grads = loss_and_grads(compiled)
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-4)
    for eager, ours in zip(eager_grads, compiled_grads, strict=True):
        assert torch.allclose(ours, eager, rtol=1e-3, atol=1e-5)


def test_resume_continues_exactly(tmp_path):
    straight = tiny_config(tmp_path / "a", steps=6)
    run(straight, progress=False)
    interrupted = tiny_config(tmp_path / "b", steps=3)
    run(interrupted, progress=False)
    run(tiny_config(tmp_path / "b", steps=6), resume=True, progress=False)
    expected, resumed = train_losses(tmp_path / "a" / "run"), train_losses(tmp_path / "b" / "run")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == expected  # bit-identical: same RNG streams, same optimizer state
    assert load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")["step"] == 6


def test_interrupt_writes_a_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Trainer.train_step

    def interrupted_step(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path, steps=5), progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1


def test_corrupted_or_truncated_checkpoint_gives_a_clear_error(tmp_path):
    run(tiny_config(tmp_path, steps=2), progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)
    completed = run_cli("--resume", "--out-dir", str(tmp_path / "run"), "--no-progress")
    assert completed.returncode == 2
    assert "truncated or corrupted" in completed.stderr and "Traceback" not in completed.stderr
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not an eotfast training checkpoint"):
        load_checkpoint(path)


def test_evaluate_command_on_a_checkpoint(tmp_path):
    run(tiny_config(tmp_path, steps=2), progress=False)
    completed = run_cli("--evaluate", str(tmp_path / "run" / "checkpoint.pt"), "--eval-size", "8")
    assert completed.returncode == 0, completed.stderr
    metrics = json.loads(completed.stdout)
    assert metrics["step"] == 2 and "target_accuracy" in metrics


# ---------------------------------------------------------------- command-line errors
@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["--ot", "hungarian"], "invalid choice: 'hungarian'"),
        (["--steps", "0"], "must be a positive integer"),
        (["--batch-size", "-4"], "must be a positive integer"),
        (["--reg", "-0.1"], "must be a positive number"),
        (["--reg", "nan"], "must be a positive number"),
        (["--ema-decay", "1.5"], "must be in [0, 1)"),
        (["--channel-mults", "1,x"], "comma-separated integers"),
        (["--image-size", "18", "--channel-mults", "1,2,2"], "divisible by 4"),
        (["--dataset", "shoes2bags", "--data-root", "{tmp}"], "shoes_64.hdf5 and handbag_64"),
        (["--dataset", "folders", "--data-root", "{tmp}"], "trainA"),
        (["--dataset", "cmnist", "--data-root", "{tmp}"], "MNIST not found"),
        (["--evaluate", "{tmp}/missing.pt"], "does not exist"),
    ],
)  # fmt: skip
def test_cli_errors_exit_2_with_a_message(tmp_path, args, message):
    completed = run_cli(*(a.format(tmp=tmp_path) for a in args), "--out-dir", str(tmp_path))
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr


def test_unavailable_backend_falls_back_in_one_line(tmp_path):
    completed = run_cli("--ot", "sinkhorn_cuda", "--steps", "1", "--no-compile", "--no-progress",
                        "--eval-size", "4", "--sample-steps", "1", "--base-channels", "8",
                        "--out-dir", str(tmp_path / "run"), "--device", "cpu")  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    fallback = [line for line in completed.stderr.splitlines() if "using sinkhorn_cpu" in line]
    assert len(fallback) == 1 and "sinkhorn_cuda" in fallback[0]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["ot_used"] == "sinkhorn_cpu"


def test_missing_data_message_names_files_and_source(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset("shoes2bags", tmp_path, 64)
    text = str(error.value)
    assert "shoes_64.hdf5" in text and "handbag_64.hdf5" in text and "iGAN" in text


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    # PIL's convert("RGB") clips 16-bit grayscale: mid-gray 30000/65535 read as white.
    from PIL import Image

    from eotfast.ddpm.data import _read_image_folder

    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(tmp_path / "gray16.png")
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(tmp_path / "rgb8.png")
    images = _read_image_folder(tmp_path, image_size=4)  # sorted: gray16, rgb8
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 4, 4)
    assert (images[0] == round(30000 / 257)).all(), images[0].unique()
    assert (images[1] == 200).all()
