"""Checkpoints of a training run: bit-identical resume, the checkpoint written on Ctrl-C,
SIGTERM or a diverged loss, what --resume keeps and what it refuses, unreadable files.
Tiny configurations, CPU only."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eotfast.ddpm.trainer import CheckpointError, TrainConfig, Trainer, load_checkpoint, run

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"


def test_resume_continues_exactly(tmp_path, tiny_config, train_losses):
    straight = tiny_config(tmp_path / "a", steps=6)
    run(straight, progress=False)
    interrupted = tiny_config(tmp_path / "b", steps=3)
    run(interrupted, progress=False)
    run(tiny_config(tmp_path / "b", steps=6), resume=True, progress=False)
    expected, resumed = train_losses(tmp_path / "a" / "run"), train_losses(tmp_path / "b" / "run")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == expected  # bit-identical: same RNG streams, same optimizer state
    assert load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")["step"] == 6


def test_interrupt_writes_a_checkpoint(tmp_path, monkeypatch, tiny_config):
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


def test_a_signal_during_the_optimizer_step_waits_for_the_step_to_end(
    tmp_path, monkeypatch, tiny_config
):
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


def test_sigterm_stops_train_py_with_a_checkpoint_and_exit_code_143(tmp_path, tiny_args):
    # A scheduler's preemption: SIGTERM, then the checkpoint, then 128 + 15.
    import signal
    import time

    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), *tiny_args[2:], "--steps", "100000", "--log-every", "1",
         "--out-dir", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TRAIN_PY.parent,
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


def test_a_diverged_loss_stops_the_run_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, tiny_config
):
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


def test_corrupted_or_truncated_checkpoint_gives_a_clear_error(tmp_path, tiny_config, run_cli):
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


def test_resume_keeps_experiment_flags_and_says_so_in_one_line(
    capsys, tmp_path, tiny_args, train_cli
):
    out = tmp_path / "run"
    assert train_cli.main([*tiny_args, "--out-dir", str(out)]) == 0
    capsys.readouterr()
    code = train_cli.main(["--resume", "--out-dir", str(out), "--steps", "3", "--batch-size",
                           "7", "--lr", "0.5", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    ignored = [line for line in err.splitlines() if "ignored" in line]
    assert len(ignored) == 1
    assert "--batch-size 7 (saved: 4)" in ignored[0] and "--lr 0.5 (saved: 0.001)" in ignored[0]
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 4 and config["lr"] == 0.001 and config["steps"] == 3
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3


def test_resume_without_flags_keeps_the_saved_run_options(tmp_path, tiny_config):
    from eotfast.ddpm.config import merge_for_resume

    saved = tiny_config(tmp_path, steps=3, compile=False, device="cpu", eval_size=8).to_dict()
    # Only --out-dir given: steps, eager mode and device stay the saved ones, not the defaults.
    config, ignored = merge_for_resume(saved, TrainConfig(out_dir="x"), {"out_dir"})
    assert (config.steps, config.compile, config.device) == (3, False, "cpu") and not ignored
    # Run options given replace the saved ones; an experiment option given equal is silent.
    given = TrainConfig(steps=9, compile=True, batch_size=8)
    config, ignored = merge_for_resume(saved, given, {"steps", "compile", "batch_size"})
    assert (config.steps, config.compile, config.batch_size) == (9, True, 8) and not ignored


def test_resume_below_the_saved_step_says_so(tmp_path, tiny_config, cli_error):
    out = tmp_path / "run"
    run(tiny_config(tmp_path, steps=2, ot="exact"), progress=False)
    err = cli_error("--resume", "--out-dir", out, "--steps", "1")
    assert "--steps 1 is below the checkpoint's step 2" in err


def test_resume_with_a_different_model_shape_is_a_checkpoint_error(
    tmp_path, tiny_config, cli_error
):
    out = tmp_path / "run"
    run(tiny_config(tmp_path, steps=2, ot="exact"), progress=False)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["config"]["base_channels"] = 16  # weights of width 8, config of width 16
    torch.save(state, out / "checkpoint.pt")
    err = cli_error("--resume", "--out-dir", out, "--steps", "3", "--no-progress")
    assert "do not fit the model" in err
