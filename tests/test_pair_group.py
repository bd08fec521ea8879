"""pair(x, y, group=...): pairing over the global batch of a process group, run as 2 gloo
processes on loopback, against one process pairing the concatenated batches and against
scipy's optimum of the global problem."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from oracles import optimum, total

import eotfast

WORLD = 2

# Each process holds its own slice of one global batch (the same seed everywhere builds it),
# pairs it with group=WORLD, and writes what it got; the parent compares.
WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
import eotfast

out, n, m = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
generator = torch.Generator().manual_seed(0)
x_all = torch.randn(world * n, 3, 4, 4, generator=generator)  # image-shaped samples
y_all = torch.randn(world * m, 3, 4, 4, generator=generator) + 0.3
x, y = x_all[rank * n : (rank + 1) * n], y_all[rank * m : (rank + 1) * m]
cases = {
    "auto": {},
    "exact": {"method": "exact"},
    "permutation": {"sampling": "permutation"},
    "sample": {"method": "sinkhorn", "generator": "seeded"},
    "random": {"method": "random", "generator": "seeded"},
}
report = {}
for name, options in cases.items():
    options = dict(options)
    if options.get("generator") == "seeded":  # seeded alike on every process
        options["generator"] = torch.Generator().manual_seed(7)
    j, partners = eotfast.pair(
        x, y, group=dist.group.WORLD, return_partners=True, **options
    )
    report[name] = {
        "j": j.tolist(),
        "partners_are_gathered_targets": torch.equal(partners, y_all[j]),
        "partner_shape": list(partners.shape),
    }
batched_x = torch.randn(world, 3, n, 5, generator=generator)[rank]  # [3 problems, n, 5]
batched_y = torch.randn(world, 3, m, 5, generator=generator)[rank]
report["batched"] = eotfast.pair(
    batched_x, batched_y, "exact", batch_dims=1, group=dist.group.WORLD
).tolist()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(report, f)
# Both processes past their last collective before either tears gloo down: a process whose
# peer closed its connections first can abort in gloo's threads ("terminate called without
# an active exception", seen once in a full test run).
dist.barrier()
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def group_reports(tmp_path_factory):
    """Both processes' reports for n = 12 sources and m = 14 targets per process."""
    folder = tmp_path_factory.mktemp("pair_group")
    worker = folder / "worker.py"
    worker.write_text(WORKER)
    n, m = 12, 14
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(worker), str(folder),
        str(n), str(m),
    ]  # fmt: skip
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=180, cwd=folder,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    reports = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return reports, n, m


def global_batches(n, m):
    """The worker's global batches, built from the same seed."""
    generator = torch.Generator().manual_seed(0)
    x_all = torch.randn(WORLD * n, 3, 4, 4, generator=generator)
    y_all = torch.randn(WORLD * m, 3, 4, 4, generator=generator) + 0.3
    batched_x = torch.randn(WORLD, 3, n, 5, generator=generator)
    batched_y = torch.randn(WORLD, 3, m, 5, generator=generator)
    return x_all, y_all, batched_x, batched_y


@pytest.mark.parametrize("case", ["auto", "exact", "permutation", "sample", "random"])
def test_group_pairing_is_one_process_pairing_the_concatenated_batches(group_reports, case):
    reports, n, m = group_reports
    x_all, y_all, _, _ = global_batches(n, m)
    options = {
        "auto": {},
        "exact": {"method": "exact"},
        "permutation": {"sampling": "permutation"},
        "sample": {"method": "sinkhorn", "generator": torch.Generator().manual_seed(7)},
        "random": {"method": "random", "generator": torch.Generator().manual_seed(7)},
    }[case]
    single = eotfast.pair(x_all, y_all, **options)  # [world * n]
    got = torch.tensor([j for report in reports for j in report[case]["j"]])
    assert torch.equal(got, single)
    for report in reports:
        assert report[case]["partners_are_gathered_targets"]
        assert report[case]["partner_shape"] == [n, 3, 4, 4]
    if case != "sample":  # distinct targets across the processes, not only within each
        assert got.unique().numel() == WORLD * n


def test_group_exact_pairing_is_scipys_optimum_of_the_global_batch(group_reports):
    # The independent oracle: the union of both processes' rows is an optimal assignment of
    # the global problem.
    reports, n, m = group_reports
    x_all, y_all, _, _ = global_batches(n, m)
    cost = (torch.cdist(x_all.flatten(1).double(), y_all.flatten(1).double()) ** 2).numpy()
    columns = np.array([j for report in reports for j in report["exact"]["j"]])
    assert total(cost, columns) == pytest.approx(optimum(cost), rel=1e-6)


def test_group_pairing_with_batch_dims_gathers_along_the_samples(group_reports):
    reports, n, m = group_reports
    _, _, batched_x, batched_y = global_batches(n, m)
    # Process r holds problems [3] x its n samples; the global problem k is the
    # concatenation of every process's samples of problem k.
    x_all = torch.cat(list(batched_x), dim=1)  # [3, world * n, 5]
    y_all = torch.cat(list(batched_y), dim=1)
    single = eotfast.pair(x_all, y_all, "exact", batch_dims=1)  # [3, world * n]
    got = torch.cat([torch.tensor(report["batched"]) for report in reports], dim=1)
    assert torch.equal(got, single)


def test_group_must_be_a_process_group():
    with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
        eotfast.pair(torch.randn(4, 3), torch.randn(4, 3), group="world")
