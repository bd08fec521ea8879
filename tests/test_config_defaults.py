"""Per-data-set defaults of the trainer (eotfast/ddpm/config.py, DATASET_DEFAULTS): what each
data set resolves to, that a value given always wins (command line and Python API), the help
text, --resume, and the 64 px U-Net they build. CPU only."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eotfast.ddpm.config import (
    DATASET_DEFAULTS,
    PER_DATASET_OPTIONS,
    ConfigError,
    TrainConfig,
    merge_for_resume,
)
from eotfast.ddpm.data import DATASETS
from eotfast.ddpm.trainer import load_checkpoint
from eotfast.ddpm.unet import ConditionalUNet

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"

# The documented 64 px recipe (config.py's table, with its sources there); literals on purpose,
# so that a change of a default fails here and is made on purpose.
IMAGES_64 = dict(
    image_size=64, base_channels=128, channel_mults=(1, 2, 3, 4), num_res_blocks=3,
    attention_levels=(2, 3), dropout=0.1, steps=300_000, batch_size=128, lr=1e-4,
    warmup_steps=5000, ema_decay=0.9999, eval_every=10_000, checkpoint_every=5000,
)  # fmt: skip

# `python train.py` as it has been: every resolved value of the digits default run.
DIGITS_RUN = dict(
    dataset="digits", data_root=None, out_dir="runs/digits-auto", image_size=16,
    source_digit=2, target_digit=3, ot="auto", reg=0.05, sampling="sample",
    ot_scope="auto", steps=600, batch_size=64, lr=1e-3, weight_decay=0.0, warmup_steps=100,
    grad_clip=1.0, ema_decay=0.995, base_channels=32, channel_mults=(1, 2, 2),
    num_res_blocks=1, attention_levels=(2,), dropout=0.0, timesteps=1000, schedule="cosine",
    prediction="v", sample_steps=25, eval_every=0, eval_size=256, checkpoint_every=200,
    log_every=20, compile=True, device="auto", precision="auto", seed=0, wandb="disabled",
)  # fmt: skip


def load_cli():
    spec = importlib.util.spec_from_file_location("train_cli_defaults", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = load_cli()


def from_cli(*args) -> TrainConfig:
    """The TrainConfig train.py's main builds from these arguments (before any run)."""
    values = vars(CLI.build_parser().parse_args([str(a) for a in args]))
    for name in CLI.COMMAND_OPTIONS:
        values.pop(name, None)
    return TrainConfig(**values)


def per_dataset(config: TrainConfig) -> dict:
    return {name: getattr(config, name) for name in PER_DATASET_OPTIONS}


# ------------------------------------------------------------------------ what resolves
@pytest.mark.parametrize("dataset", ["shoes2bags", "folders"])
def test_64px_datasets_resolve_to_the_documented_recipe(dataset):
    assert per_dataset(TrainConfig(dataset=dataset).resolved()) == IMAGES_64
    assert per_dataset(from_cli("--dataset", dataset).resolved()) == IMAGES_64


def test_digits_resolves_to_exactly_the_values_of_the_default_run():
    assert TrainConfig().resolved().to_dict() == DIGITS_RUN
    assert from_cli().resolved().to_dict() == DIGITS_RUN
    cmnist = TrainConfig(dataset="cmnist").resolved().to_dict()
    assert cmnist == {**DIGITS_RUN, "dataset": "cmnist", "image_size": 32,
                      "out_dir": "runs/cmnist-auto"}  # fmt: skip


def test_every_dataset_has_a_valid_row_and_every_row_option_defaults_to_none():
    assert set(DATASET_DEFAULTS) == set(DATASETS)
    for dataset, values in DATASET_DEFAULTS.items():
        assert tuple(values) == PER_DATASET_OPTIONS, dataset
        TrainConfig(dataset=dataset).resolved()  # validates
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in PER_DATASET_OPTIONS:
        assert fields[name].default is None, name
    # Unresolved, a per-data-set option is None; the run resolves it.
    assert TrainConfig(dataset="shoes2bags").base_channels is None


# --------------------------------------------------------------------- a value given wins
GIVEN = dict(base_channels=64, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
             attention_levels=(), dropout=0.0, steps=1000, batch_size=32, lr=2e-4,
             warmup_steps=0, ema_decay=0.995, eval_every=0, checkpoint_every=200,
             image_size=32)  # fmt: skip


def test_a_value_given_to_the_python_api_overrides_the_dataset_default():
    # Values equal to digits' defaults, zeros and empty tuples are given values too.
    config = TrainConfig(dataset="shoes2bags", **GIVEN).resolved()
    assert per_dataset(config) == GIVEN
    one = TrainConfig(dataset="shoes2bags", base_channels=32).resolved()
    assert per_dataset(one) == {**IMAGES_64, "base_channels": 32}


def test_a_value_given_on_the_command_line_overrides_the_dataset_default():
    args = ["--dataset", "shoes2bags", "--base-channels", "64", "--channel-mults", "1,2,2,2",
            "--num-res-blocks", "2", "--attention-levels", "", "--dropout", "0",
            "--steps", "1000", "--batch-size", "32", "--lr", "2e-4", "--warmup-steps", "0",
            "--ema-decay", "0.995", "--eval-every", "0", "--checkpoint-every", "200",
            "--image-size", "32"]  # fmt: skip
    assert per_dataset(from_cli(*args).resolved()) == GIVEN
    config = from_cli("--dataset", "shoes2bags", "--steps", "5").resolved()
    assert per_dataset(config) == {**IMAGES_64, "steps": 5}


def test_help_lists_each_option_per_dataset():
    help_text = " ".join(CLI.build_parser().format_help().split())
    assert (
        "U-Net width at full resolution (a multiple of 8) (default: per data set: digits "
        "32, cmnist 32, shoes2bags 128, folders 128; in [8, 4096])"
    ) in help_text
    assert (
        "(default: per data set: digits 1,2,2, cmnist 1,2,2, shoes2bags 1,2,3,4, folders 1,2,3,4;"
    ) in help_text
    assert (
        "optimizer steps of the whole run (default: per data set: digits 600, cmnist 600, "
        "shoes2bags 300000, folders 300000;"
    ) in help_text
    assert "(default: per data set: digits 0.001, cmnist 0.001, shoes2bags 0.0001," in help_text
    for name in PER_DATASET_OPTIONS:  # every one, from the one table
        values = ", ".join(
            f"{d} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
            for d, v in ((d, DATASET_DEFAULTS[d][name]) for d in DATASET_DEFAULTS)
        )
        assert f"(default: per data set: {values}" in help_text, name


# ---------------------------------------------------------------------- checks, resolved
def test_resolved_values_are_checked_in_one_line_naming_the_flag(capsys, tmp_path):
    with pytest.raises(ConfigError) as error:
        TrainConfig(dataset="shoes2bags", channel_mults=(1, 2))
    message = str(error.value)
    assert message.startswith("--attention-levels must name levels of --channel-mults (1,2")
    assert "--attention-levels 2,3 is the shoes2bags default" in message
    with pytest.raises(ConfigError, match="--base-channels must be a multiple of 8 "):
        TrainConfig(dataset="shoes2bags", base_channels=100)
    with pytest.raises(ConfigError, match="--image-size 64 is the shoes2bags default"):
        TrainConfig(dataset="shoes2bags", channel_mults=(1,) * 8, attention_levels=())
    # The command line: exit code 2, one line, nothing run.
    code = CLI.main(["--dataset", "shoes2bags", "--channel-mults", "1,2",
                     "--out-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--attention-levels" in err and "shoes2bags default" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- --resume
def test_resume_of_a_shoes2bags_config_keeps_its_values():
    # Checkpoints hold the resolved config (Trainer resolves before saving); through JSON
    # (config.json) tuples come back as lists.
    saved = json.loads(json.dumps(TrainConfig(dataset="shoes2bags").resolved().to_dict()))
    # `--resume --out-dir x`: nothing else given, so the given config is digits' defaults.
    config, ignored = merge_for_resume(saved, from_cli("--out-dir", "x"), {"out_dir"})
    assert config.dataset == "shoes2bags" and not ignored
    assert per_dataset(config) == IMAGES_64 and per_dataset(config.resolved()) == IMAGES_64
    # Run options given take the new value; experiment options are kept and reported.
    given = from_cli("--out-dir", "x", "--steps", "400000", "--eval-every", "0", "--lr", "0.5")
    config, ignored = merge_for_resume(saved, given, {"out_dir", "steps", "eval_every", "lr"})
    assert per_dataset(config.resolved()) == {**IMAGES_64, "steps": 400_000, "eval_every": 0}
    assert ignored == ["--lr 0.5 (saved: 0.0001)"]
    # Named but left at None (its data set's default): the saved value stays.
    config, ignored = merge_for_resume(saved, TrainConfig(out_dir="x"), {"out_dir", "steps"})
    assert config.steps == 300_000 and not ignored


def test_a_shoes2bags_run_saves_resolved_values_and_resumes_with_them(capsys, tmp_path):
    h5py = pytest.importorskip("h5py")
    root, out = tmp_path / "data", tmp_path / "run"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, count in (("shoes_64.hdf5", 20), ("handbag_64.hdf5", 20)):
        with h5py.File(root / name, "w") as file:
            file.create_dataset("imgs", data=rng.integers(0, 256, (count, 64, 64, 3), np.uint8))
    # A tiny model and batch for the CPU; optimizer, EMA, dropout, intervals left to the
    # data set.
    tiny = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
            "--attention-levels", "1", "--image-size", "16", "--batch-size", "4",
            "--eval-size", "4", "--sample-steps", "2", "--timesteps", "50", "--no-compile",
            "--no-progress", "--ot", "exact", "--data-root", str(root)]  # fmt: skip
    assert CLI.main(["--dataset", "shoes2bags", "--steps", "1", "--out-dir", str(out), *tiny]) == 0
    expected = {**IMAGES_64, "base_channels": 8, "channel_mults": (1, 2), "num_res_blocks": 1,
                "attention_levels": (1,), "image_size": 16, "batch_size": 4}  # fmt: skip
    saved = load_checkpoint(out / "checkpoint.pt")["config"]
    assert {name: saved[name] for name in PER_DATASET_OPTIONS} == {**expected, "steps": 1}
    # Resume naming neither the data set nor the model: the saved values carry on.
    code = CLI.main(["--resume", "--out-dir", str(out), "--steps", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    resumed = {name: config[name] for name in PER_DATASET_OPTIONS}
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in resumed.items()} == {
        **expected, "steps": 2}  # fmt: skip
    assert config["dataset"] == "shoes2bags" and load_checkpoint(out / "checkpoint.pt")["step"] == 2


# ------------------------------------------------------------------- the 64 px U-Net
def test_the_shoes2bags_unet_runs_at_64px_and_has_the_cited_size():
    config = TrainConfig(dataset="shoes2bags").resolved()
    torch.manual_seed(0)
    model = ConditionalUNet(
        base_channels=config.base_channels,
        channel_mults=config.channel_mults,
        num_res_blocks=config.num_res_blocks,
        attention_levels=config.attention_levels,
        dropout=config.dropout,
    )
    # 115,942,147 weights. iDDPM's ImageNet-64 U-Net at the same width, depth, multipliers and
    # attention is its "100M" model; DDPM's CIFAR-10 one is 35.7M, ADM's 192-wide ImageNet-64
    # 270-296M. This one adds the condition's 3 input channels and has no scale-shift norm.
    count = sum(p.numel() for p in model.parameters())
    assert 90e6 <= count <= 130e6, count
    size = config.image_size
    x, cond = torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]), cond)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
