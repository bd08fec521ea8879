"""One training step (Trainer.train_step, the step the run loop takes and the train_step
benchmark times): the OT partners it trains on, the compiled loss against eager, bf16
autocast. Tiny configurations; CPU unless marked."""

import json
import math

import pytest
import torch

from eotfast.ddpm.trainer import Trainer, run

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("ot,sampling", [("auto", "sample"), ("sinkhorn", "permutation")])
def test_distinct_target_pairings_use_each_target_once(tmp_path, ot, sampling, tiny_config):
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


def test_compiled_step_matches_eager_and_has_no_graph_break(tmp_path, tiny_config):
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


def test_the_run_loop_takes_train_step(tmp_path, tiny_config, train_losses):
    # What the train_step benchmark times is what training runs: the losses run() logs are,
    # bit for bit, those of Trainer.train_step called on a trainer built alone.
    config = tiny_config(tmp_path, steps=4, log_every=1, ot="exact")
    run(config, progress=False)
    trainer = Trainer(config)
    losses = {step: trainer.train_step().item() for step in range(1, 5)}
    assert train_losses(tmp_path / "run") == losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_bf16_autocast_runs_and_matches_fp32(tmp_path, device, tiny_config):
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
    # A few steps, so that the U-Net's output is not the zero of its init.
    for _ in range(3):
        trainer.train_step()
    torch.manual_seed(1)
    bf16 = trainer.loss_fn(source, target, partner)
    torch.manual_seed(1)
    fp32 = trainer.diffusion.training_loss(trainer.model, partner, cond=source)
    hook.remove()
    assert seen[-2] == torch.bfloat16 and seen[-1] == torch.float32
    assert bf16.dtype == torch.float32  # the loss is reduced in fp32
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.05)


def test_precision_auto_is_fp32_on_the_cpu(tmp_path, tiny_config):
    assert Trainer(tiny_config(tmp_path, precision="auto", device="cpu")).autocast is None


@CUDA
def test_compiled_bf16_run_on_a_gpu_pairs_on_the_device(tmp_path, run_cli, train_losses):
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
