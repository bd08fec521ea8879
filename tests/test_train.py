"""The trainer (train.py, eotfast/ddpm): data sets, samplers, the compiled step, checkpoints,
resume, evaluation and the command line's error paths. Tiny configurations, CPU only."""

import colorsys
import json
import math
import re
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
@pytest.mark.parametrize("ot,sampling", [("auto", "sample"), ("sinkhorn", "permutation")])
def test_distinct_target_pairings_use_each_target_once(tmp_path, ot, sampling):
    from scipy.optimize import linear_sum_assignment

    trainer = Trainer(tiny_config(tmp_path, ot=ot, sampling=sampling, batch_size=16))
    source, target = trainer.next_batch()
    partner = trainer.loss_fn.partners(source, target)  # [B, C, H, W]
    assert partner.shape == target.shape
    # The partners are the targets, each once (as multisets of images).
    assert sorted(map(tuple, partner.flatten(1).tolist())) == sorted(
        map(tuple, target.flatten(1).tolist())
    )
    cost = (torch.cdist(source.flatten(1).double(), target.flatten(1).double()) ** 2).numpy()
    optimum = cost[linear_sum_assignment(cost)].sum()
    ours = float((source.double() - partner.double()).square().sum())
    random = cost.mean(1).sum()
    assert ours >= optimum * (1 - 1e-6)
    # auto is the auction on the CPU: the optimum; the permutation from the plan: near it.
    assert (random - ours) / (random - optimum) > (0.999999 if ot == "auto" else 0.95)


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
    original = Trainer.next_batch

    def interrupted_batch(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "next_batch", interrupted_batch)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path, steps=5), progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1


def test_a_signal_during_the_optimizer_step_waits_for_the_step_to_end(tmp_path, monkeypatch):
    # SIGINT as optimizer.step() returns (before the scheduler, EMA and step counter): the
    # checkpoint must hold one step, not step 3's weights and AdamW state under step 2.
    import signal

    build = Trainer.__init__

    def with_hook(self, *args, **kwargs):
        build(self, *args, **kwargs)
        calls = [0]

        def after_step(optimizer, args, kwargs):
            calls[0] += 1
            if calls[0] == 3:
                signal.raise_signal(signal.SIGINT)

        self.optimizer.register_step_post_hook(after_step)

    monkeypatch.setattr(Trainer, "__init__", with_hook)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path, steps=10, checkpoint_every=100), progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    adam_steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert state["step"] == 3 and adam_steps == {3}
    assert state["scheduler"]["last_epoch"] == 3


def test_sigterm_stops_train_py_with_a_checkpoint_and_exit_code_143(tmp_path):
    # A scheduler's preemption: SIGTERM, then the checkpoint, then 128 + 15.
    import signal
    import time

    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), *TINY_ARGS[2:], "--steps", "100000", "--log-every", "1",
         "--out-dir", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n"):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM at step" in stderr
    assert load_checkpoint(out / "checkpoint.pt")["step"] >= 1


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
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    completed = run_cli("--evaluate", checkpoint, "--eval-size", "8")
    assert completed.returncode == 0, completed.stderr
    metrics = json.loads(completed.stdout)
    assert metrics["step"] == 2 and "target_accuracy" in metrics
    assert "ignored" not in completed.stderr
    # Flags that --evaluate does not use are named in one line, not dropped without a word.
    completed = run_cli("--evaluate", checkpoint, "--eval-size", "8", "--steps", "5", "--lr",
                        "0.1")  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "ignored: --lr, --steps" in completed.stderr
    assert json.loads(completed.stdout)["step"] == 2


# ---------------------------------------------------------------- command-line errors
@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["--ot", "hungarian"], "invalid choice: 'hungarian'"),
        (["--steps", "0"], "must be a positive integer"),
        (["--batch-size", "-4"], "must be a positive integer"),
        (["--reg", "-0.1"], "must be a positive number"),
        (["--reg", "nan"], "must be a finite number"),
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


# ------------------------------------- TrainConfig: the one validated source of options
def load_cli():
    """train.py as a module, to call its main() in-process (no interpreter start per case)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = load_cli()
TINY_ARGS = ["--steps", "2", "--batch-size", "4", "--base-channels", "8", "--channel-mults",
             "1,2", "--attention-levels", "1", "--eval-size", "4", "--sample-steps", "2",
             "--timesteps", "50", "--no-compile", "--no-progress", "--ot", "exact"]  # fmt: skip


def cli_error(capsys, *args) -> str:
    """Runs train.py's main in-process; asserts exit code 2 and one line on stderr."""
    try:
        code = CLI.main([str(a) for a in args])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_every_option_is_a_field_with_help_and_its_default():
    import dataclasses

    help_text = " ".join(CLI.build_parser().format_help().split())
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata["help"] and field.metadata["resume"] in ("run", "experiment")
        name = field.name.replace("_", "-")
        assert f"--{name}" in help_text or f"--no-{name}" in help_text, name
    assert "optimizer steps of the whole run (default: per data set: digits 600," in help_text
    assert "(default: per data set: digits 16, cmnist 32" in help_text


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(lr=float("inf")), "--lr must be a finite number"),
        (dict(reg=1e-45), "--reg must be in [1e-06, 1e+06]"),
        (dict(reg=float("inf")), "--reg must be a finite number"),
        (dict(out_dir=""), "--out-dir must not be empty"),
        (dict(attention_levels=(7,)), "--attention-levels must name levels"),
        (dict(attention_levels=(-1,)), "--attention-levels (every entry) must be in [0"),
        (dict(channel_mults=()), "--channel-mults must name at least one level"),
        (dict(channel_mults=(0,)), "--channel-mults (every entry) must be in [1, 64]"),
        (dict(base_channels=12), "--base-channels must be a multiple of 8"),
        (dict(seed=-1), "--seed must be >= 0"),
        (dict(seed=2**70), "--seed must be in [0, 4294967295]"),
        (dict(source_digit=11), "--source-digit must be in [0, 9]"),
        (dict(target_digit=10), "--target-digit must be in [0, 9]"),
        (dict(image_size=1), "--image-size must be in [8, 512]"),
        (dict(image_size=100_000), "--image-size must be in [8, 512]"),
        (dict(sample_steps=60, timesteps=50), "--sample-steps (60) must be at most --timesteps"),
        (dict(eval_size=1), "--eval-size must be in [2,"),
        (dict(schedule="linear", timesteps=20, sample_steps=2), "linear needs --timesteps >= 21"),
        (dict(device="bogus"), "--device must be auto, cpu, cuda or cuda:N"),
        (dict(device="meta"), "--device must be auto, cpu, cuda or cuda:N"),
        (dict(steps=2.5), "--steps must be an integer"),
        (dict(compile="yes"), "--compile must be True or False"),
        (dict(ot="exact", sampling="permutation"), "--sampling permutation takes distinct"),
        (dict(ot="emd", sampling="permutation"), "use it with --ot sinkhorn"),
    ],
)  # fmt: skip
def test_python_api_gets_the_cli_checks(overrides, message):
    from eotfast.ddpm.config import ConfigError

    with pytest.raises(ConfigError) as error:
        TrainConfig(**overrides)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--device", "bogus"], "--device must be"),
        (["--device", "meta"], "--device must be"),
        (["--device", "cuda:7"] if torch.cuda.is_available() else ["--device", "cuda"],
         "--device cuda"),
        (["--source-digit", "11"], "--source-digit"),
        (["--target-digit", "10"], "--target-digit"),
        (["--channel-mults", "0"], "--channel-mults"),
        (["--channel-mults", ""], "--channel-mults"),
        (["--image-size", "1"], "--image-size"),
        (["--image-size", "100000"], "--image-size"),
        (["--reg", "inf"], "--reg must be a finite number"),
        (["--reg", "1e-45"], "--reg"),
        (["--lr", "inf"], "--lr"),
        (["--out-dir", ""], "--out-dir must not be empty"),
        (["--attention-levels", "7"], "--attention-levels"),
        (["--attention-levels", "-1"], "--attention-levels"),
        (["--base-channels", "12"], "--base-channels"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**70)], "--seed"),
        (["--sample-steps", "60", "--timesteps", "50"], "--sample-steps"),
        (["--eval-size", "1"], "--eval-size"),
        (["--schedule", "linear", "--timesteps", "20", "--sample-steps", "2"], "--timesteps >= 21"),
        (["--steps", "many"], "invalid int value"),
    ],
)  # fmt: skip
def test_cli_rejects_unusable_values_in_one_line(capsys, tmp_path, args, message):
    err = cli_error(capsys, *args, "--out-dir", tmp_path / "run") if "--out-dir" not in args \
        else cli_error(capsys, *args)  # fmt: skip
    assert message in err
    assert not (tmp_path / "run").exists()  # rejected before anything ran


def test_unwritable_out_dir_is_found_before_training(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    err = cli_error(capsys, *TINY_ARGS, "--out-dir", blocker / "run")
    assert "--out-dir" in err and "not a writable folder" in err


@pytest.mark.parametrize("name", ["checkpoint.pt", "config.json", "metrics.jsonl"])
def test_a_folder_in_place_of_a_run_file_is_found_before_training(capsys, tmp_path, name):
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    err = cli_error(capsys, *TINY_ARGS, "--out-dir", out)
    assert "--out-dir" in err and f"{name} is not a file" in err
    assert not (out / "metrics.jsonl").is_file()  # refused before the first step


def write_png_folders(root: Path, count: int = 12) -> None:
    write_image_folder(root / "trainA", count, seed=0)
    write_image_folder(root / "trainB", count, seed=1)


@pytest.mark.parametrize("bad", ["not_an_image", "empty", "truncated", "directory", "dangling"])
def test_bad_files_in_an_image_folder_are_named(capsys, tmp_path, bad):
    root = tmp_path / "data"
    write_png_folders(root)
    target = root / "trainA" / "bad.png"
    if bad == "not_an_image":
        target.write_text("hello")
    elif bad == "empty":
        target.write_bytes(b"")
    elif bad == "truncated":
        data = (root / "trainA" / "0.png").read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif bad == "directory":
        target.mkdir()
    else:
        target.symlink_to(root / "missing.png")
    err = cli_error(capsys, *TINY_ARGS, "--dataset", "folders", "--data-root", root,
                    "--out-dir", tmp_path / "run")  # fmt: skip
    assert "bad.png" in err


@pytest.mark.parametrize("case", ["no_images", "group", "one_image"])
def test_unusable_hdf5_files_are_found_before_training(capsys, tmp_path, case):
    h5py = pytest.importorskip("h5py")
    root = tmp_path / "data"
    root.mkdir()
    write_hdf5(root / "handbag_64.hdf5", 20, 64, seed=1)
    with h5py.File(root / "shoes_64.hdf5", "w") as file:
        if case == "no_images":
            file.create_dataset("imgs", data=np.zeros((0, 64, 64, 3), np.uint8))
        elif case == "group":
            file.create_group("imgs")
        else:
            file.create_dataset("imgs", data=np.zeros((1, 64, 64, 3), np.uint8))
    err = cli_error(capsys, *TINY_ARGS, "--dataset", "shoes2bags", "--data-root", root,
                    "--image-size", "16", "--out-dir", tmp_path / "run")  # fmt: skip
    assert "shoes_64.hdf5" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    if case == "one_image":
        assert "too few to hold out a test split" in err


def test_cmnist_with_empty_idx_files_is_a_data_error(capsys, tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # fmt: skip
        (raw / name).write_bytes(b"")
    err = cli_error(capsys, *TINY_ARGS, "--dataset", "cmnist", "--data-root", tmp_path / "data",
                    "--out-dir", tmp_path / "run")  # fmt: skip
    assert "cmnist" in err and "MNIST" in err


def test_linear_schedule_needs_21_timesteps():
    with pytest.raises(ValueError, match="at least 21"):
        beta_schedule("linear", 20)
    assert beta_schedule("linear", 21).max() < 1
    assert torch.isfinite(GaussianDiffusion(21, "linear").alpha_bar).all()


# ---------------------------------------------------------- what --resume does per flag
def test_resume_keeps_experiment_flags_and_says_so_in_one_line(capsys, tmp_path):
    out = tmp_path / "run"
    assert CLI.main([*TINY_ARGS, "--out-dir", str(out)]) == 0
    capsys.readouterr()
    code = CLI.main(["--resume", "--out-dir", str(out), "--steps", "3", "--batch-size", "7",
                     "--lr", "0.5", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    ignored = [line for line in err.splitlines() if "ignored" in line]
    assert len(ignored) == 1
    assert "--batch-size 7 (saved: 4)" in ignored[0] and "--lr 0.5 (saved: 0.001)" in ignored[0]
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 4 and config["lr"] == 0.001 and config["steps"] == 3
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3


def test_resume_without_flags_keeps_the_saved_run_options(tmp_path):
    from eotfast.ddpm.config import merge_for_resume

    saved = tiny_config(tmp_path, steps=3, compile=False, device="cpu", eval_size=8).to_dict()
    # Only --out-dir given: steps, eager mode and device stay the saved ones, not the defaults.
    config, ignored = merge_for_resume(saved, TrainConfig(out_dir="x"), {"out_dir"})
    assert (config.steps, config.compile, config.device) == (3, False, "cpu") and not ignored
    # Run options given replace the saved ones; an experiment option given equal is silent.
    given = TrainConfig(steps=9, compile=True, batch_size=8)
    config, ignored = merge_for_resume(saved, given, {"steps", "compile", "batch_size"})
    assert (config.steps, config.compile, config.batch_size) == (9, True, 8) and not ignored


def test_resume_below_the_saved_step_says_so(capsys, tmp_path):
    out = tmp_path / "run"
    run(tiny_config(tmp_path, steps=2, ot="exact"), progress=False)
    err = cli_error(capsys, "--resume", "--out-dir", out, "--steps", "1")
    assert "--steps 1 is below the checkpoint's step 2" in err


def test_resume_with_a_different_model_shape_is_a_checkpoint_error(capsys, tmp_path):
    out = tmp_path / "run"
    run(tiny_config(tmp_path, steps=2, ot="exact"), progress=False)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["config"]["base_channels"] = 16  # weights of width 8, config of width 16
    torch.save(state, out / "checkpoint.pt")
    err = cli_error(capsys, "--resume", "--out-dir", out, "--steps", "3", "--no-progress")
    assert "do not fit the model" in err


# ------------------------------------------------------------------------------- FID
def test_frechet_distance_matches_the_closed_form_without_scipy_sqrtm(monkeypatch):
    import scipy.linalg

    from eotfast.ddpm.metrics import frechet_distance

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=generator) * torch.tensor([1, 2, 3, 0.5, 1, 1]) + 1
    b = torch.randn(400, 6, generator=generator) @ torch.randn(6, 6, generator=generator)
    A, B = a.double().numpy(), b.double().numpy()
    cov_a, cov_b = np.cov(A, rowvar=False), np.cov(B, rowvar=False)
    expected = ((A.mean(0) - B.mean(0)) ** 2).sum() + np.trace(
        cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real
    )

    def no_sqrtm(*args, **kwargs):
        raise AssertionError("scipy.linalg.sqrtm called")

    monkeypatch.setattr(scipy.linalg, "sqrtm", no_sqrtm)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 feature vectors"):
        frechet_distance(a[:1], b)


def test_missing_inception_weights_give_the_same_message(tmp_path, monkeypatch):
    from eotfast.ddpm.metrics import InceptionFeatures, inception_weights_path

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as error:
        InceptionFeatures()
    assert str(inception_weights_path()) in str(error.value)
    assert "FID needs pytorch-fid's Inception weights" in str(error.value)


# ---------------------------------------------------------- torchrun (DDP) and bf16
DDP_WORKER = r"""
import json, sys
from pathlib import Path

import torch

from eotfast.ddpm.config import TrainConfig
from eotfast.ddpm.distributed import all_gather_cat, gather_objects, join, launched_world, leave
from eotfast.ddpm.trainer import Trainer, run

from eotfast.ddpm.trainer import resolve_device

out, tiny = Path(sys.argv[1]), json.loads(sys.argv[2])
world = launched_world()
join(resolve_device(tiny["device"], world))  # gloo on the CPU, NCCL on GPUs
rank, report = world.rank, {}
config = TrainConfig(**{**tiny, "out_dir": str(out / "steps"), "ot_scope": "global"})

# Global pairing: one problem over both processes' batches, the same on both.
trainer = Trainer(config, world=world)
source, target = trainer.next_batch()
state = trainer.pair_generator.get_state()
partner = trainer.global_partners(source, target)
all_sources, all_targets = all_gather_cat(source, world), all_gather_cat(target, world)
single = Trainer(config)  # a single process pairing the concatenated batches
single.pair_generator.set_state(state)
single_partners = single.loss_fn.partners(
    all_sources, all_targets, generator=single.pair_generator)
size = len(source)
report["pairing_is_the_single_process_one"] = torch.equal(
    partner, single_partners[rank * size : (rank + 1) * size])
pairings = gather_objects(single_partners, world)
report["same_pairing_on_every_process"] = all(torch.equal(pairings[0], p) for p in pairings)

# A few steps: weights identical across processes, and equal to one process taking the same
# steps on the global batches (same partners, timesteps and noise).
records = []
for _ in range(3):
    trainer.model.train()
    source, target = trainer.next_batch()
    partner = trainer.global_partners(source, target)
    records.append((source, partner, torch.get_rng_state()))
    trainer.apply_gradients(trainer.step_fn(source, target, partner))
records = gather_objects(records, world)
weights = gather_objects([p.detach().clone() for p in trainer.model.parameters()], world)
report["weights_identical_across_processes"] = all(
    torch.equal(a, b) for other in weights[1:] for a, b in zip(weights[0], other))
if rank == 0:
    for step in range(3):
        losses = []
        for r in range(world.size):
            source, partner, rng = records[r][step]
            torch.set_rng_state(rng)
            losses.append(single.diffusion.training_loss(single.model, partner, cond=source))
        single.apply_gradients(sum(losses) / world.size)
    report["max_difference_to_one_process"] = max(
        float((a.detach() - b).abs().max())
        for a, b in zip(single.model.parameters(), weights[0]))

# The run loop: an interrupted and resumed run gives the losses of an uninterrupted one.
run(TrainConfig(**{**tiny, "steps": 4, "out_dir": str(out / "straight")}), progress=False)
run(TrainConfig(**{**tiny, "steps": 2, "out_dir": str(out / "resumed")}), progress=False)
run(TrainConfig(**{**tiny, "steps": 4, "out_dir": str(out / "resumed")}), resume=True,
    progress=False)
(out / f"report_{rank}.json").write_text(json.dumps(report))
del trainer
leave()
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(worker: Path, *args: str, popen: bool = False, **options):
    """Runs ``worker`` as 2 processes under torchrun on loopback, one thread each (the
    machine's 2 cores), in the worker's folder: subprocess.run's result, or the Popen."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(worker),
        *args,
    ]
    options.update(text=True, cwd=worker.parent,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if popen:
        return subprocess.Popen(command, **options)
    return subprocess.run(command, capture_output=True, timeout=180, **options)


TWO_GPUS = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)


@pytest.mark.parametrize(
    "device",
    [pytest.param("cpu", id="cpu-gloo"), pytest.param("cuda", marks=TWO_GPUS, id="cuda-nccl")],
)
def test_two_processes_pair_globally_and_match_one_process(tmp_path, device):
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    tiny = {k: v for k, v in TINY.items() if k not in ("steps",)}
    tiny.update(batch_size=4, eval_size=4, log_every=1, checkpoint_every=2, ot="sinkhorn")
    # fp32 on GPUs too: the comparison with one process is of DDP, not of bf16 rounding.
    tiny.update(device=device, precision="fp32")
    completed = torchrun(worker, str(tmp_path), json.dumps(tiny))
    assert completed.returncode == 0, completed.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report_{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["pairing_is_the_single_process_one"]
        assert report["same_pairing_on_every_process"]
        assert report["weights_identical_across_processes"]
    # cuDNN's convolutions need not sum in the same order twice: a looser bound on GPUs.
    assert reports[0]["max_difference_to_one_process"] < (1e-5 if device == "cpu" else 1e-4)
    straight, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(straight) == [1, 2, 3, 4]  # one line per step: rank 0 alone writes
    if device == "cpu":
        assert resumed == straight
    else:
        assert resumed == pytest.approx(straight, rel=1e-4)
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["world_size"] == 2 and config["ot_scope_used"] == "global"
    assert len(list((tmp_path / "straight" / "samples").iterdir())) == 1


CRASH_WORKER = r"""
import json, os, sys

from eotfast.ddpm.config import TrainConfig
from eotfast.ddpm.trainer import Trainer, run

out, options, fail_at = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
draw, calls = Trainer.next_batch, [0]


def next_batch(self):  # rank 1 fails when it draws its fail_at-th batch
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == fail_at:
        raise RuntimeError("injected failure on rank 1")
    return draw(self)


Trainer.next_batch = next_batch
run(TrainConfig(**options, out_dir=out), resume=os.path.exists(out + "/checkpoint.pt"),
    progress=False)
"""


def test_a_crash_on_one_of_two_processes_ends_the_run_with_a_checkpoint(tmp_path):
    # Rank 1 fails as step 3 begins; rank 0 finds out in the next collective (the global
    # pairing's gather) and writes step 2's state, which a new 2-process run resumes.
    worker = tmp_path / "crash_worker.py"
    worker.write_text(CRASH_WORKER)
    options = {k: v for k, v in TINY.items() if k not in ("steps", "checkpoint_every")}
    options.update(batch_size=4, eval_size=4, checkpoint_every=100, ot="sinkhorn")

    def launch(steps, fail_at):
        run_dir, options_text = str(tmp_path / "run"), json.dumps({**options, "steps": steps})
        return torchrun(worker, run_dir, options_text, str(fail_at))

    crashed = launch(steps=6, fail_at=3)
    assert crashed.returncode != 0
    assert "injected failure on rank 1" in crashed.stderr
    # Rank 0 learns of it from the failed collective or from torchrun's SIGTERM, whichever
    # comes first: either way it writes step 2.
    assert re.search(r"stopped by (an error|SIGTERM) at step 2: checkpoint written to",
                     crashed.stderr), crashed.stderr[-3000:]  # fmt: skip
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    resumed = launch(steps=4, fail_at=0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 4
    assert sorted(train_losses(tmp_path / "run")) == [1, 2, 3, 4]


def test_ctrl_c_under_torchrun_ends_the_run_with_a_checkpoint(tmp_path):
    # Ctrl-C in a terminal sends SIGINT to torchrun and to every process it started.
    import os
    import signal
    import time

    worker = tmp_path / "crash_worker.py"
    worker.write_text(CRASH_WORKER)  # with fail_at 0: no injected failure
    options = {k: v for k, v in TINY.items() if k not in ("steps", "checkpoint_every")}
    options.update(batch_size=4, eval_size=4, checkpoint_every=10**6, ot="sinkhorn", steps=10**6)
    process = torchrun(
        worker,
        str(tmp_path / "run"),
        json.dumps(options),
        "0",
        popen=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert "stopped by SIGINT at step" in stderr, stderr[-3000:]
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"]
    # The last complete step: logged, or interrupted between its update and its log line.
    assert 3 <= max(train_losses(tmp_path / "run")) <= saved


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_bf16_autocast_runs_and_matches_fp32(tmp_path, device):
    # --precision auto: fp32 on the CPU, bf16 on GPUs that support it.
    precision = "bf16" if device == "cpu" else "auto"
    trainer = Trainer(tiny_config(tmp_path, precision=precision, ot="exact", device=device))
    assert trainer.autocast is torch.bfloat16
    seen = []
    hook = trainer.model.input_conv.register_forward_hook(
        lambda module, inputs, output: seen.append(output.dtype)
    )
    source, target = trainer.next_batch()
    partner = trainer.loss_fn.partners(source, target)
    # Train a few steps in fp32 so that the U-Net's output is not the zero of its init.
    for _ in range(3):
        trainer.apply_gradients(trainer.diffusion.training_loss(trainer.model, partner, source))
    torch.manual_seed(1)
    bf16 = trainer.loss_fn(source, target, partner)
    torch.manual_seed(1)
    fp32 = trainer.diffusion.training_loss(trainer.model, partner, cond=source)
    hook.remove()
    assert seen[-2] == torch.bfloat16 and seen[-1] == torch.float32
    assert bf16.dtype == torch.float32  # the loss is reduced in fp32
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.05)


def test_precision_auto_is_fp32_on_the_cpu(tmp_path):
    assert Trainer(tiny_config(tmp_path, precision="auto", device="cpu")).autocast is None


@CUDA
def test_compiled_bf16_run_on_a_gpu_pairs_on_the_device(tmp_path):
    # The README's GPU command, shortened: Triton pairing inside the compiled bf16 step.
    completed = run_cli(
        "--device",
        "cuda",
        "--ot",
        "sinkhorn_triton",
        "--steps",
        "20",
        "--no-progress",
        "--eval-size",
        "8",
        "--out-dir",
        str(tmp_path / "run"),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["ot_used"] == "sinkhorn_triton" and config["precision_used"] == "bf16"
    assert all(math.isfinite(loss) for loss in train_losses(tmp_path / "run").values())


def test_a_diverged_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from eotfast.ddpm.trainer import PairedDenoisingLoss, TrainingDiverged, finite_or_none

    original, calls = PairedDenoisingLoss.forward, {"n": 0}

    def diverging(self, *args):
        calls["n"] += 1
        loss = original(self, *args)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(PairedDenoisingLoss, "forward", diverging)
    config = tiny_config(tmp_path, steps=4, checkpoint_every=1, log_every=2, ot="exact")
    with pytest.raises(TrainingDiverged, match="loss became nan by step 2"):
        run(config, progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert json.dumps(finite_or_none({"psnr": float("nan"), "step": 3})) == (
        '{"psnr": null, "step": 3}'
    )
