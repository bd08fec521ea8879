"""The trainer's evaluation (eotfast/ddpm/evaluation.py, metrics.py): hue against colorsys,
the Frechet distance against its closed form, every metric of a digits run, and
``train.py --evaluate`` on a checkpoint. CPU only."""

import colorsys
import json

import numpy as np
import pytest
import torch

from eotfast.ddpm.metrics import hue_degrees, hue_difference
from eotfast.ddpm.trainer import run


def test_hue_degrees_matches_colorsys():
    hues = torch.rand(50) * 360
    colors = torch.tensor([colorsys.hsv_to_rgb(h / 360, 0.8, 0.9) for h in hues.tolist()])
    images = colors[:, :, None, None].expand(50, 3, 4, 4) * torch.rand(50, 1, 4, 4)
    assert hue_difference(hue_degrees(images), hues).max() < 0.1
    assert torch.isnan(hue_degrees(torch.zeros(1, 3, 4, 4))).all()  # black has no hue


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


def test_digits_run_reports_every_metric(tmp_path, tiny_config):
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


def test_evaluate_command_on_a_checkpoint(tmp_path, tiny_config, run_cli):
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
