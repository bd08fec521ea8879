"""The trainer under torchrun: 2 processes (gloo on the CPU, NCCL on 2 GPUs) pair over the
global batch as one process would, train to the same weights, resume exactly, and end with a
checkpoint when one process fails or on Ctrl-C."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eotfast.ddpm.trainer import load_checkpoint

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

# A few steps of train_step: weights identical across processes, and equal to one process
# taking the same steps on the global batches (same partners, timesteps and noise).
records, step_fn = [], trainer.step_fn


def recorded_step_fn(source, target, partner):  # the loss's inputs, and its RNG state
    records.append((source, partner, torch.get_rng_state()))
    return step_fn(source, target, partner)


trainer.step_fn = recorded_step_fn
for _ in range(3):
    trainer.train_step()
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
        # One process's update on the mean loss: AdamW on the clipped gradient.
        single.optimizer.zero_grad(set_to_none=True)
        (sum(losses) / world.size).backward()
        torch.nn.utils.clip_grad_norm_(single.model.parameters(), config.grad_clip)
        single.optimizer.step()
        single.scheduler.step()
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
def test_two_processes_pair_globally_and_match_one_process(tmp_path, device, train_losses, tiny):
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    tiny = {k: v for k, v in tiny.items() if k not in ("steps",)}
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


def test_a_crash_on_one_of_two_processes_ends_the_run_with_a_checkpoint(
    tmp_path, train_losses, tiny
):
    # Rank 1 fails as step 3 begins; rank 0 finds out in the next collective (the global
    # pairing's gather) and writes step 2's state, which a new 2-process run resumes.
    worker = tmp_path / "crash_worker.py"
    worker.write_text(CRASH_WORKER)
    options = {k: v for k, v in tiny.items() if k not in ("steps", "checkpoint_every")}
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


def test_ctrl_c_under_torchrun_ends_the_run_with_a_checkpoint(tmp_path, train_losses, tiny):
    # Ctrl-C in a terminal sends SIGINT to torchrun and to every process it started.
    import os
    import signal
    import time

    worker = tmp_path / "crash_worker.py"
    worker.write_text(CRASH_WORKER)  # with fail_at 0: no injected failure
    options = {k: v for k, v in tiny.items() if k not in ("steps", "checkpoint_every")}
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
