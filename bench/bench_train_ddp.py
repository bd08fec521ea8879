"""train_ddp: steps/s of the trainer with 1 and 2 processes (torchrun, gloo, CPU), and what the
global pairing's gather costs per step.

Each case launches ``torchrun --nproc_per_node=N`` on a worker that builds the default digits
trainer (eager step, --ot-scope global), warms up, then times ``STEPS`` optimizer steps, and
separately the all_gather of the source and target batches the global pairing does. With 2
processes each step trains on twice the images (--batch-size is per process), so the
throughput to compare is images/s. ``python bench/bench_train_ddp.py`` prints the table.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

STEPS = 20

WORKER = r"""
import json, sys, time
import torch
from eotfast.ddpm.config import TrainConfig
from eotfast.ddpm.distributed import all_gather_cat, barrier, join, launched_world, leave
from eotfast.ddpm.trainer import Trainer

steps, out = int(sys.argv[1]), sys.argv[2]
world = launched_world()
join(torch.device("cpu"))
trainer = Trainer(TrainConfig(compile=False, ot_scope="global", out_dir=out), world=world)
for _ in range(3):
    trainer.train_step()
barrier(world)
start = time.perf_counter()
for _ in range(steps):
    trainer.train_step()
barrier(world)
step_s = (time.perf_counter() - start) / steps
source, target = trainer.next_batch()
gathers = []
for _ in range(steps):
    begin = time.perf_counter()
    all_gather_cat(source, world), all_gather_cat(target, world)
    gathers.append(time.perf_counter() - begin)
if world.rank == 0:
    print("RESULT " + json.dumps({
        "processes": world.size, "batch_per_process": trainer.config.batch_size,
        "steps_per_s": 1 / step_s, "images_per_s": world.size * trainer.config.batch_size / step_s,
        "gather_ms": 1e3 * sorted(gathers)[len(gathers) // 2],
        "gather_share": sorted(gathers)[len(gathers) // 2] / step_s,
    }))
del trainer
leave()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, steps: int = STEPS) -> dict:
    """Runs the worker under torchrun with ``processes`` gloo processes; returns its result."""
    with tempfile.TemporaryDirectory() as folder:
        worker = Path(folder) / "worker.py"
        worker.write_text(WORKER)
        threads = max(1, (os.cpu_count() or 1) // processes)  # processes share the cores
        completed = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
             "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(worker),
             str(steps), folder],
            capture_output=True, text=True, timeout=900,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )  # fmt: skip
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr[-3000:])
    line = next(x for x in completed.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("processes", [1, 2])
def test_train_ddp(benchmark, processes):
    result = {}
    benchmark.pedantic(lambda: result.update(launch(processes)), rounds=1, iterations=1)
    benchmark.group = "train_ddp (gloo, CPU)"
    benchmark.extra_info.update(op="train_ddp", provider=f"{processes} process(es)", **result)


if __name__ == "__main__":
    print("| processes | batch per process | steps/s | images/s | gather ms | gather share |")
    print("| --- | --- | --- | --- | --- | --- |")
    for count in (1, 2):
        r = launch(count)
        cells = [count, r["batch_per_process"], f"{r['steps_per_s']:.2f}",
                 f"{r['images_per_s']:.0f}", f"{r['gather_ms']:.3f}",
                 f"{r['gather_share']:.2%}"]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
