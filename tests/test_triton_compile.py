"""The Triton kernels through the real compiler, for the GPUs our users run (sm_80, sm_90).

The interpreter (TRITON_INTERPRET=1, the other Triton tests on a machine without a GPU)
accepts code the compiler rejects and runs a program's warps in lockstep, so it can show
neither a compile error nor a missing barrier. Here every configuration the launchers use
(each dtype, one and several programs per problem, sample and argmax, aligned, odd and 1 x 1
shapes, specialized as the JIT specializes them) is compiled to a cubin by
``tests/triton_aot.py`` in a subprocess, on any machine: no GPU needed. The tests fail on a
compile error, on register spills, on shared memory over the target's limit, and on a global
store that a later load of the same buffer may follow with no CTA barrier in between.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

WORKER = Path(__file__).with_name("triton_aot.py")
ARCHS = (80, 90)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """arch -> rows of tests/triton_aot.py's report; the two archs compile in parallel."""
    folder = tmp_path_factory.mktemp("triton_aot")
    processes = {
        arch: subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--arch",
                str(arch),
                "--out",
                str(folder / f"{arch}.json"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for arch in ARCHS
    }
    rows = {}
    for arch, process in processes.items():
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"tests/triton_aot.py --arch {arch} failed:\n{output}"
        rows[arch] = json.loads((folder / f"{arch}.json").read_text())
    print("\n" + table(rows))  # shown with `pytest -s`
    return rows


def table(rows) -> str:
    lines = [f"{'configuration':<42} {'arch':<5} {'regs':>5} {'spill st/ld':>12} "
             f"{'smem':>7} {'bar.sync':>8}"]  # fmt: skip
    for arch, report in rows.items():
        for row in report:
            if "error" in row:
                lines.append(f"{row['name']:<42} sm_{arch} {row['error'][:60]}")
                continue
            spills = f"{row['spill_stores']}/{row['spill_loads']}"
            lines.append(f"{row['name']:<42} sm_{arch} {row['registers']:>5} {spills:>12} "
                         f"{row['shared']:>7} {row['ptx_barriers']:>8}")  # fmt: skip
    return "\n".join(lines)


def kernel_rows(reports, arch):
    return [row for row in reports[arch] if not row["name"].startswith("handover_probe")]


def test_every_launcher_configuration_is_compiled(reports):
    rows = [row for row in kernel_rows(reports, 90) if row["kernel"] != "auction_kernel"]
    names = {row["name"].split()[0] for row in rows}
    assert names == {"cost_matrix", "sinkhorn", "draw_partners"}
    assert len(rows) == 4 * (3 + 2 + 2)  # shapes x (dtypes, programs, modes)


def test_every_auction_configuration_is_compiled(reports):
    # triton_aot.AUCTION_SHAPES (aligned, odd, odd_square, ones) x (float32, float64)
    names = [row["name"] for row in kernel_rows(reports, 90) if row["kernel"] == "auction_kernel"]
    assert sorted(names) == sorted(
        f"auction {dtype} {shape}"
        for dtype in ("float32", "float64")
        for shape in ("aligned", "odd", "odd_square", "ones")
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile(reports, arch):
    failed = [f"{row['name']}: {row['error']}" for row in reports[arch] if "error" in row]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_do_not_spill_registers(reports, arch):
    spilling = [
        f"{row['name']}: {row['spill_stores']} B stored, {row['spill_loads']} B loaded, "
        f"{row['registers']} registers"
        for row in kernel_rows(reports, arch)
        if row.get("spill_stores") or row.get("spill_loads")
    ]
    assert not spilling, "\n".join(spilling) + "\n" + table(reports)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_fits_the_target(reports, arch):
    over = [
        f"{row['name']}: {row['shared']} B > {row['shared_limit']} B"
        for row in kernel_rows(reports, arch)
        if row.get("shared", 0) > row.get("shared_limit", 0)
    ]
    assert not over, "\n".join(over)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_global_hand_over_between_warps_is_behind_a_cta_barrier(reports, arch):
    races = [
        f"{row['name']}:\n  " + "\n  ".join(row["unordered_handovers"])
        for row in kernel_rows(reports, arch)
        if row.get("unordered_handovers")
    ]
    assert not races, "\n".join(races)


@pytest.mark.parametrize("arch", ARCHS)
def test_barrier_check_finds_missing_barriers(reports, arch):
    # The check's own oracle: a kernel that reads back, through another layout and across a
    # loop's back edge, what it stored, then overwrites it; with and without the barriers.
    probes = {row["name"]: row for row in reports[arch] if row["name"].startswith("handover")}
    assert probes["handover_probe barrier=True"]["unordered_handovers"] == []
    assert probes["handover_probe barrier=True"]["ptx_barriers"] >= 2
    found = probes["handover_probe barrier=False"]["unordered_handovers"]
    assert [finding.split("`")[0] for finding in found] == ["load ", "store "], found


@pytest.mark.parametrize("arch", ARCHS)
def test_grid_barrier_arrives_once_per_program(reports, arch):
    # Several programs per problem meet at a counter: one release atomic per program and
    # barrier, issued by a single thread (predicated), then acquire loads until all arrived.
    # The launcher gives a 1 x 1 problem one program whatever is asked (it has one block).
    rows = kernel_rows(reports, arch)
    cooperative = [row for row in rows if "programs=4" in row["name"] and "ones" not in row["name"]]
    single = [row for row in rows if "programs=1" in row["name"] or "ones" in row["name"]]
    assert cooperative and all(row["release_atomics"] for row in cooperative)
    assert all(not row["release_atomics"] for row in single)  # no counter with one program
    unpredicated = [
        f"{row['name']}: {line}"
        for row in cooperative
        for line in row["release_atomics"]
        if not line.startswith("@")
    ]
    assert not unpredicated, "\n".join(unpredicated)
