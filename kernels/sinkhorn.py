"""Triton kernel: batched log-domain Sinkhorn with per-problem stopping decided on the device.

Iterates as POT's ``ot.bregman.sinkhorn_log`` and the torch reference
:func:`eotfast.ops.torch_backend.sinkhorn_reference`: from f = 0,
``g_j = epsilon (log b_j - LSE_i((f_i - C_ij) / epsilon))`` then
``f_i = epsilon (log a_i - LSE_j((g_j - C_ij) / epsilon))``, each over-relaxed at the target
epsilon (the reference's rule); a problem stops once
``sqrt(||P 1 - a||^2 + ||P^T 1 - b||^2) < tol`` for P = exp((f + g - C) / epsilon) (the row
term is 0 up to rounding when the f update is not relaxed).

The error costs no extra sweep: the column log-sum-exp that updates g also gives the column
masses of the current plan, ``exp(g_j / epsilon + LSE_i((f_i - C_ij) / epsilon))``, and the
row sweep gives its row masses likewise. So each round starts with the column sweep, which
measures the plan (f, g) of the previous round and writes the new g to ``g_next``; only if
that plan misses ``tol`` does the round go on with the row sweep (f from g_next), set
g = g_next and count.

One launch solves every problem to the end: grid (B, programs). Each problem is shared by
``programs`` programs: program p sweeps column blocks p, p + programs, ... and then row blocks
likewise. With one program per problem (many problems, or small ones) that is a plain
persistent kernel. With several, the programs of a problem meet at a grid barrier twice per
round (after the column sweep: every program needs the total error and every new g; after the
row sweep: every program needs every f), built from release/acquire atomics on a per-problem
counter. That needs every program of the launch resident at once, which the launcher ensures
(programs x B <= SMs) and which the interpreter cannot give (it runs programs one after the
other): under ``TRITON_INTERPRET=1`` a problem always gets one program.

A CTA barrier (``tl.debug_barrier``) separates every global store from a later load of the
same buffer by the program (the read-back), and every load from a later store to it (the
overwrite): Triton orders only its own shared-memory traffic, and two accesses to one element
come from different warps whenever the two tensors have different layouts (a column slice of
a 2D tile against a 1D range). tests/test_triton_compile.py checks this on the compiled code.

Reference: :func:`eotfast.ops.torch_backend.sinkhorn_reference`; tests: tests/test_sinkhorn.py
(POT and the reference, every backend, under TRITON_INTERPRET=1 on the CPU), tests/test_triton.py
(grid barriers, on a GPU), tests/test_triton_compile.py (the real compiler for sm_80 / sm_90,
barriers); bench: bench/bench_sinkhorn.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from eotfast.kernels._launch import launch, multiprocessor_count, register_cap
from eotfast.kernels._tiles import load_cost_tile

from eotfast.ops import common as relaxation_rule

# A @triton.jit function may read a module global only if it is a tl.constexpr: the compiler
# rejects a plain float (the interpreter does not).
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)): exp2 is native
LN2 = tl.constexpr(0.6931471805599453)
# The over-relaxation rule's constants, from their one source (eotfast.ops.common).
STALL_CHECK_ROUNDS = tl.constexpr(relaxation_rule.STALL_CHECK_ROUNDS)
PROBE_ROUNDS = tl.constexpr(relaxation_rule.PROBE_ROUNDS)
SLOW_RATE_POWER = tl.constexpr(relaxation_rule.SLOW_RATE ** (relaxation_rule.PROBE_ROUNDS // 2))


@triton.jit
def _online_logsumexp_step(running_max, running_sum, z, AXIS: tl.constexpr):
    """One block of an online log-sum-exp in base 2 along AXIS (z = -inf where masked)."""
    new_max = tl.maximum(running_max, tl.max(z, axis=AXIS))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # all masked so far
    if AXIS == 0:
        block_sum = tl.sum(tl.exp2(z - safe_max[None, :]), axis=0)
    else:
        block_sum = tl.sum(tl.exp2(z - safe_max[:, None]), axis=1)
    running_sum = running_sum * tl.exp2(running_max - safe_max) + block_sum
    return new_max, running_sum


@triton.jit
def _column_logsumexp(
    cost_ptr,
    f_ptr,
    cols,
    col_mask,
    n,
    m,
    inv_epsilon2,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """LSE_i((f_i - C_ij) / epsilon) for a block of columns, in natural-log units [BLOCK_M]."""
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    for i0 in range(0, n, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        cost, mask = load_cost_tile(cost_ptr, rows, row_mask, cols, col_mask, m)
        f = tl.load(f_ptr + rows, mask=row_mask, other=0.0)
        z = tl.where(mask, (f[:, None] - cost) * inv_epsilon2, float("-inf"))  # base-2 units
        running_max, running_sum = _online_logsumexp_step(running_max, running_sum, z, 0)
    return (running_max + tl.log2(running_sum)) * LN2


@triton.jit
def _row_logsumexp(
    cost_ptr, g_ptr, rows, row_mask, m, inv_epsilon2, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr
):
    """LSE_j((g_j - C_ij) / epsilon) for a block of rows, in natural-log units [BLOCK_N]."""
    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_N,), tl.float32)
    for j0 in range(0, m, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_mask = cols < m
        cost, mask = load_cost_tile(cost_ptr, rows, row_mask, cols, col_mask, m)
        g = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
        z = tl.where(mask, (g[None, :] - cost) * inv_epsilon2, float("-inf"))
        running_max, running_sum = _online_logsumexp_step(running_max, running_sum, z, 1)
    return (running_max + tl.log2(running_sum)) * LN2


@triton.jit
def _relax(old, new, relaxation):
    """(1 - w) old + w new (= new when w = 1, old finite), and new itself where either is -inf
    (a point of zero mass: 0 * -inf would be NaN)."""
    plain = (old == float("-inf")) | (new == float("-inf"))
    return tl.where(plain, new, (1.0 - relaxation) * old + relaxation * new)


@triton.jit
def _column_sweep(
    cost_ptr, b_ptr, f_ptr, g_ptr, g_next_ptr, program, programs, column_blocks, n, m,
    epsilon, inv_epsilon2, relaxation, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Over this program's column blocks: the new g = (1 - w) g + w G(f) (stored at
    g_next_ptr; w = relaxation) and the squared column violation of the plan (f, g),
    returned."""
    # float64: the squared violations of a plan of total mass 1e30 overflow float32 (the error
    # read inf), those of mass 1e-30 underflow (it read 0). m values per round: no cost.
    squared = tl.zeros((), tl.float64)
    for block in range(program, column_blocks, programs):
        cols = block * BLOCK_M + tl.arange(0, BLOCK_M)
        col_mask = cols < m
        lse = _column_logsumexp(
            cost_ptr, f_ptr, cols, col_mask, n, m, inv_epsilon2, BLOCK_N, BLOCK_M
        )
        b = tl.load(b_ptr + cols, mask=col_mask, other=1.0)
        g = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
        mass = tl.exp2((g / epsilon + lse) * LOG2E)
        violation = (mass - b).to(tl.float64)
        squared += tl.sum(tl.where(col_mask, violation * violation, 0.0), axis=0)
        g_next = _relax(g, epsilon * (tl.log(b) - lse), relaxation)
        tl.store(g_next_ptr + cols, g_next, mask=col_mask)
    return squared


@triton.jit
def _row_sweep(
    cost_ptr, a_ptr, f_ptr, g_ptr, program, programs, row_blocks, n, m, epsilon, inv_epsilon2,
    relaxation, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """f = (1 - w) f + w F(g) over this program's row blocks (none when row_blocks is 0; w =
    relaxation), and the squared row violation of the new plan (f, g), returned: its row
    masses exp(f_i / epsilon + lse_i) come with the log-sum-exp (a_i exactly when w = 1)."""
    squared = tl.zeros((), tl.float64)
    for block in range(program, row_blocks, programs):
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        lse = _row_logsumexp(cost_ptr, g_ptr, rows, row_mask, m, inv_epsilon2, BLOCK_N, BLOCK_M)
        a = tl.load(a_ptr + rows, mask=row_mask, other=1.0)
        f = tl.load(f_ptr + rows, mask=row_mask, other=0.0)
        tl.debug_barrier()  # the loads of f above before the stores that overwrite it
        f = _relax(f, epsilon * (tl.log(a) - lse), relaxation)
        mass = tl.exp2((f / epsilon + lse) * LOG2E)
        violation = (mass - a).to(tl.float64)
        squared += tl.sum(tl.where(row_mask, violation * violation, 0.0), axis=0)
        tl.store(f_ptr + rows, f, mask=row_mask)
        tl.debug_barrier()  # ... and before the next block's loads of f (in other warps)
    return squared


@triton.jit
def _copy_columns(src_ptr, dst_ptr, program, programs, column_blocks, m, BLOCK_M: tl.constexpr):
    """dst = src over this program's column blocks (none when column_blocks is 0)."""
    for block in range(program, column_blocks, programs):
        cols = block * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(dst_ptr + cols, tl.load(src_ptr + cols, mask=cols < m), mask=cols < m)


@triton.jit
def _sync_programs(arrivals_ptr, programs, generation, COOPERATIVE: tl.constexpr):
    """Barrier over the programs of one problem: global stores before it are seen by every
    program's loads after it. ``generation`` counts this problem's barriers, 1 for the first.

    Within a program it is a CTA barrier. Across programs, each one adds 1 to the problem's
    counter with release semantics (after the CTA barrier, so its warps' stores come first)
    and spins with acquire loads until all have arrived (``generation * programs``), then
    releases its warps with a second CTA barrier: the pattern of CUDA's cooperative
    ``grid.sync()``. A scalar atomic is issued by one thread and its value broadcast.
    """
    tl.debug_barrier()
    if COOPERATIVE:
        tl.atomic_add(arrivals_ptr, 1, sem="release", scope="gpu")
        target = generation * programs
        arrived = tl.atomic_add(arrivals_ptr, 0, sem="acquire", scope="gpu")
        while arrived < target:
            arrived = tl.atomic_add(arrivals_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


@triton.jit
def sinkhorn_kernel(
    cost_ptr, a_ptr, b_ptr, epsilon_ptr,  # [B, n, m], [B, n], [B, m], [B] float32
    epsilon_start_ptr,                    # [B] float32: round k at max(eps, start * scaling^k)
    f_ptr, g_ptr,                         # [B, n], [B, m] float32 outputs
    g_next_ptr,                           # [B, m] float32 scratch: g of the round under way
    partial_ptr, arrivals_ptr,            # [B, programs] float64 scratch, [B] int32 zeros
    n_iter_ptr, error_ptr,                # [B] int64, [B] float32 outputs
    n, m, max_iter, tol, log2_scaling, relaxation, programs,  # log2 of the epsilon factor
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,                # power of two >= programs
    COOPERATIVE: tl.constexpr,            # programs > 1: grid barriers between the sweeps
):  # fmt: skip
    problem = tl.program_id(0).to(tl.int64)  # axis 0: up to 2^31 - 1 problems
    program = tl.program_id(1)
    cost_ptr += problem * n * m
    a_ptr += problem * n
    f_ptr += problem * n
    b_ptr += problem * m
    g_ptr += problem * m
    g_next_ptr += problem * m
    partial_ptr += problem * programs
    arrivals_ptr += problem
    target_epsilon = tl.load(epsilon_ptr + problem).to(tl.float32)
    epsilon_start = tl.load(epsilon_start_ptr + problem).to(tl.float32)
    epsilon = tl.maximum(target_epsilon, epsilon_start)
    inv_epsilon2 = LOG2E / epsilon
    row_blocks = tl.cdiv(n, BLOCK_N)
    column_blocks = tl.cdiv(m, BLOCK_M)

    # f = 0 and g = 0 (POT's start), each program over the blocks it owns.
    for block in range(program, row_blocks, programs):
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(f_ptr + rows, tl.zeros((BLOCK_N,), tl.float32), mask=rows < n)
    for block in range(program, column_blocks, programs):
        cols = block * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(g_ptr + cols, tl.zeros((BLOCK_M,), tl.float32), mask=cols < m)
    generation = 1
    _sync_programs(arrivals_ptr, programs, generation, COOPERATIVE)  # f, g -> column sweep

    iteration = tl.full((), 0, tl.int32)
    # The error in float32 (its square root fits where its square may not: the partials are
    # float64); float64 scalars here spilled 12 bytes on sm_80.
    error = tl.full((), float("inf"), tl.float32)
    proceed = iteration < max_iter
    # The row sweep of a round measures the rows of the plan that the next round's column
    # sweep measures the columns of: this program's share, carried over.
    row_squared = tl.zeros((), tl.float64)
    # Whether the previous round, whose row sweep measured the rows, ran at the target too.
    was_at_target = epsilon <= target_epsilon
    # Over-relaxed at the target epsilon only, and only while the error decreases: every
    # STALL_CHECK_ROUNDS rounds there, an error not below the last check's ends it (the
    # torch reference's rule: relaxation amplifies rounding noise near the fixed point).
    # And only where the plain iteration is slow (PROBE_ROUNDS plain rounds at the target
    # first, the torch reference's rule).
    relaxing = tl.full((), 1, tl.int1)
    # One register holds the probe's reference error, then each stall check's (a separate
    # float64 one spilled 28 bytes on sm_90).
    checkpoint = tl.full((), float("inf"), tl.float32)
    target_rounds = tl.full((), 0, tl.int32)
    while proceed:
        at_target = epsilon <= target_epsilon
        slow = at_target & relaxing & (target_rounds >= PROBE_ROUNDS)
        w = tl.where(slow, relaxation, 1.0).to(tl.float32)
        # Column sweep: g_next, and the squared column violation of the plan (f, g) of the
        # previous round.
        squared = _column_sweep(
            cost_ptr, b_ptr, f_ptr, g_ptr, g_next_ptr, program, programs, column_blocks, n, m,
            epsilon, inv_epsilon2, w, BLOCK_N, BLOCK_M,
        )  # fmt: skip
        tl.store(partial_ptr + program, squared + row_squared)
        generation += 1
        _sync_programs(arrivals_ptr, programs, generation, COOPERATIVE)  # partials, g_next

        # The verdict, the same in every program: the partials summed in one fixed order.
        shares = tl.arange(0, BLOCK_P)
        total = tl.sum(tl.load(partial_ptr + shares, mask=shares < programs, other=0.0), axis=0)
        # A problem may stop on its error only at the target epsilon (rows and columns both
        # measured there); stopped by max_iter before, its error is inf (the potentials belong
        # to a larger epsilon).
        at_target = at_target & was_at_target
        measured = tl.where(at_target | (total != total), tl.sqrt(total), float("inf"))
        measured = measured.to(tl.float32)
        error = tl.where(iteration > 0, measured, error)
        target_rounds += (at_target & (iteration > 0)).to(tl.int32)
        probe_end = target_rounds == PROBE_ROUNDS
        relaxing = relaxing & ~(probe_end & (error < checkpoint * SLOW_RATE_POWER))
        stall_check = at_target & (iteration > 0) & (iteration % STALL_CHECK_ROUNDS == 0)
        stall_check = stall_check & (target_rounds > PROBE_ROUNDS)
        relaxing = relaxing & ~(stall_check & ~(error < checkpoint))
        # The probe's reference at its midpoint; none at its end (relaxing may raise the error
        # at first); each stall check's own error after that.
        new_reference = stall_check | (target_rounds == PROBE_ROUNDS // 2)
        checkpoint = tl.where(new_reference, error, checkpoint)
        checkpoint = tl.where(probe_end, float("inf"), checkpoint)
        # NaN compares false: a problem that went NaN stops, and reports it.
        update = ((error >= tol) | ~at_target) & (iteration < max_iter) & (error == error)

        # A kept round: f from g_next (row sweep), then g = g_next over this program's own
        # columns, which only its own column sweep reads next. The final, measure-only round
        # does neither: (f, g) stay the plan it measured.
        kept_row_blocks = tl.where(update, row_blocks, 0)
        kept_column_blocks = tl.where(update, column_blocks, 0)
        row_squared = _row_sweep(
            cost_ptr, a_ptr, f_ptr, g_next_ptr, program, programs, kept_row_blocks, n, m,
            epsilon, inv_epsilon2, w, BLOCK_N, BLOCK_M,
        )  # fmt: skip
        was_at_target = epsilon <= target_epsilon
        _copy_columns(g_next_ptr, g_ptr, program, programs, kept_column_blocks, m, BLOCK_M)
        iteration += update.to(tl.int32)
        proceed = update
        # float32 throughout (torch.compile passes Python floats such as log2_scaling as fp64).
        annealed = (epsilon_start * tl.exp2(iteration * log2_scaling)).to(tl.float32)
        epsilon = tl.maximum(target_epsilon, annealed)
        inv_epsilon2 = LOG2E / epsilon
        generation += 1
        _sync_programs(arrivals_ptr, programs, generation, COOPERATIVE)  # f, g -> next round

    first = program == 0
    tl.store(n_iter_ptr + problem, iteration.to(tl.int64), mask=first)
    tl.store(error_ptr + problem, error.to(tl.float32), mask=first)


def programs_per_problem(batch: int, n: int, m: int, device: torch.device, block: int) -> int:
    """How many programs share one problem.

    One when the batch alone fills the GPU, when the problem is small (a grid barrier costs
    about as much as a round of a problem this small on one SM), and under the interpreter.
    Otherwise as many as the problem has blocks, capped so that every program of the launch
    is resident at once (programs x B <= SMs): the grid barrier needs that to make progress.
    """
    if device.type != "cuda":
        return 1
    sms = multiprocessor_count(device)
    if batch * 2 > sms or n * m <= SMALL_PROBLEM_ENTRIES:
        return 1
    blocks = max(triton.cdiv(n, block), triton.cdiv(m, block))
    return max(1, min(blocks, sms // batch))


# Below this many cost entries a problem is solved by one program. Measured on an H100
# (bench/tune_sinkhorn_triton.py): at n = m = 64 one program takes 0.79 ms, two 1.5 ms; at
# n = m = 256, one 9.4 ms, four 4.1 ms. 128^2 lies between the two; it was not measured. The
# batch rule (one program per problem once 2 B > SMs) is not measured either: past it the
# batch alone keeps half the SMs busy.
SMALL_PROBLEM_ENTRIES = 128 * 128


def launch_sinkhorn(
    cost, a, b, epsilon, max_iter: int, tol: float, *,
    epsilon_start=None,
    scaling: float = 0.5,
    relaxation: float = 1.0,
    programs: int | None = None,
    block_n: int = 64,  # 64 x 64 blocks: within 3-30% of the best of 5 block shapes at every
    block_m: int = 64,  # size of the H100 sweep (bench/README.md); 128 x 32 led at n >= 256
    num_warps: int = 8,
):  # fmt: skip
    """Launcher of :func:`sinkhorn_kernel` on contiguous float32 [B, n, m] problems (a [B, n],
    b [B, m], epsilon [B]); one launch whatever the convergence. Epsilon scaling as the torch
    reference: round k at max(epsilon, epsilon_start * scaling**k) (``epsilon_start=None``: the
    plain iteration), over-relaxed by ``relaxation`` at the target epsilon. ``programs`` per
    problem defaults to :func:`programs_per_problem`.
    Returns (f, g, n_iter, marginal_error) as the torch reference does."""
    if epsilon_start is None:
        epsilon_start = epsilon
    batch, n, m = cost.shape
    device = cost.device
    if programs is None:
        programs = programs_per_problem(batch, n, m, device, max(block_n, block_m))
    # A program beyond the problem's row and column blocks would only wait at the barriers
    # (and the 1 x 1 problem with four programs spilled 68 bytes on sm_80).
    programs = max(1, min(programs, max(triton.cdiv(n, block_n), triton.cdiv(m, block_m))))
    if programs > 1 and device.type == "cpu":
        raise ValueError(
            "programs > 1 needs a GPU: the interpreter runs the programs of a problem one after "
            "the other, and the first would wait forever for the others at the grid barrier"
        )
    if device.type == "cuda" and programs * batch > multiprocessor_count(device):
        raise ValueError(
            f"programs={programs} per problem x batch={batch} exceeds the "
            f"{multiprocessor_count(device)} SMs of {device}: the programs of a problem wait "
            "for each other, so all of them must be resident at once"
        )
    f = torch.empty((batch, n), dtype=torch.float32, device=device)
    g = torch.empty((batch, m), dtype=torch.float32, device=device)
    g_next = torch.empty((batch, m), dtype=torch.float32, device=device)
    partial = torch.empty((batch, programs), dtype=torch.float64, device=device)
    arrivals = torch.zeros((batch,), dtype=torch.int32, device=device)
    n_iter = torch.empty((batch,), dtype=torch.int64, device=device)
    error = torch.empty((batch,), dtype=torch.float32, device=device)
    launch(sinkhorn_kernel, (batch, programs), device)(
        cost, a, b, epsilon, epsilon_start, f, g, g_next, partial, arrivals, n_iter, error,
        n, m, max_iter, tol, math.log2(scaling), relaxation, programs,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_P=triton.next_power_of_2(programs),
        COOPERATIVE=programs > 1,
        # 8 warps: with 4, sizes that are not multiples of 16 (scalar loads) spill on sm_80
        # (44 bytes, 276 with grid barriers). Measured on an H100 (bench/tune_sinkhorn_triton.py,
        # 64 x 64 blocks): the same time within 3% with several programs per problem (61.3 vs
        # 62.7 ms at n = 1024), 10-20% slower with one (0.87 vs 0.79 ms at n = 64).
        num_warps=num_warps,
        # 255 (the most at 8 warps): uncapped, ptxas chose 64 registers and spilled at 64 x 64
        # blocks on sm_90; the odd shapes use up to 231.
        **register_cap(255),
    )  # fmt: skip
    return f, g, n_iter, error
