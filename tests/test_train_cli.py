"""train.py's command line and TrainConfig's checks: every option is a field with its help
and default; an unusable value, a missing data set or an unwritable run folder gives one line
and exit code 2 before anything runs; the Python API gets the same checks. CPU only."""

import json
import signal
import sys

import pytest
import torch
from conftest import TRAIN_PY

from eotfast.ddpm.trainer import TrainConfig


def test_every_option_is_a_field_with_help_and_its_default(train_cli):
    import dataclasses

    help_text = " ".join(train_cli.build_parser().format_help().split())
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
def test_cli_rejects_unusable_values_in_one_line(tmp_path, args, message, cli_error):
    err = cli_error(*args, "--out-dir", tmp_path / "run") if "--out-dir" not in args \
        else cli_error(*args)  # fmt: skip
    assert message in err
    assert not (tmp_path / "run").exists()  # rejected before anything ran


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
def test_cli_errors_exit_2_with_a_message(tmp_path, args, message, run_cli):
    completed = run_cli(*(a.format(tmp=tmp_path) for a in args), "--out-dir", str(tmp_path))
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr


def test_unwritable_out_dir_is_found_before_training(tmp_path, cli_error, tiny_args):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    err = cli_error(*tiny_args, "--out-dir", blocker / "run")
    assert "--out-dir" in err and "not a writable folder" in err


@pytest.mark.parametrize("name", ["checkpoint.pt", "config.json", "metrics.jsonl"])
def test_a_folder_in_place_of_a_run_file_is_found_before_training(
    tmp_path, name, cli_error, tiny_args
):
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    err = cli_error(*tiny_args, "--out-dir", out)
    assert "--out-dir" in err and f"{name} is not a file" in err
    assert not (out / "metrics.jsonl").is_file()  # refused before the first step


def test_unavailable_backend_falls_back_in_one_line(tmp_path, run_cli):
    completed = run_cli("--ot", "sinkhorn_cuda", "--steps", "1", "--no-compile", "--no-progress",
                        "--eval-size", "4", "--sample-steps", "1", "--base-channels", "8",
                        "--out-dir", str(tmp_path / "run"), "--device", "cpu")  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    fallback = [line for line in completed.stderr.splitlines() if "using sinkhorn_cpu" in line]
    assert len(fallback) == 1 and "sinkhorn_cuda" in fallback[0]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["ot_used"] == "sinkhorn_cpu"


@pytest.mark.parametrize("delay", [0.3, 0.8])
def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path, delay):
    # SIGINT while torch and the library load (the first ~1.5 s) printed a KeyboardInterrupt
    # traceback; later on main() turns it into exit 130. Either moment must end the same way.
    import subprocess
    import time

    process = subprocess.Popen(
        [sys.executable, str(TRAIN_PY), "--out-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, (process.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
