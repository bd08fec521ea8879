"""Triton kernel: batched auction solver of the linear assignment problem, Jacobi bidding.

Problem: min over injections sigma of sum_i C[i, sigma(i)], cost C [n, m] with n <= m. It is
made square by m - n virtual rows n..m-1 of cost 0 (never stored): an optimal assignment of
the padded problem, restricted to the real rows, is an optimal injection of the original one.

Forward auction with epsilon scaling (Bertsekas 1988; Jacobi form: Bertsekas and Castanon
1991). Column j has a price p_j. A phase with epsilon e starts with every row unassigned and
the prices of the previous phase (or the input). In a round every unassigned row i bids:

    w1 = min_j (C[i, j] + p_j) at j1 (lowest j on ties),  w2 = min_{j != j1} (C[i, j] + p_j),
    bid_i = p_j1 + ((w2 - w1) + e)                         (w2 = w1 when m = 1),

then each column that received bids goes to its highest bidder (ties to the lowest row) at
that bidder's price, and its previous owner becomes unassigned. Every owner then satisfies
e-complementary slackness, C[i, j] + p_j <= min_k (C[i, k] + p_k) + e: a bid is computed
from the prices at the start of the round, and prices only rise. A phase ends when every row
is assigned; the phases run at e = max(epsilon_final, epsilon_start * scaling^k) (each
epsilon the previous one times ``scaling``, in the cost's dtype, as the other backends), and
the last one (e = epsilon_final) leaves an assignment within m * epsilon_final of the
optimum (exactly optimal for integer costs when m * epsilon_final < 1).

One program solves one problem (grid (B,)), all of its phases, and stops on its own: no host
read, one launch whatever the number of rounds. A round is four passes over the queue of
bidders, each separated from the next by a CTA barrier:

1. bid: each bidder scans its cost row in [BLOCK_N, BLOCK_M] tiles (C + p, running w1, j1,
   w2), stores its column and bid in its slot, and ``atomic_max``es an integer key of the bid
   (same order as the float) into the column's key;
2. each bidder whose key equals its column's key ``atomic_min``es its row into the column's
   winner: the highest bid, ties to the lowest row, whatever the order the warps ran in;
3. each winner reads the column's previous owner, then (barrier) takes the column at its bid
   and resets the column's key and winner for the next round; each slot leaves the row that
   bids next round: the loser itself, or the winner's displaced owner, or none;
4. the rows left are compacted (prefix sum) into the queue.

The virtual rows are identical (cost 0), so in a round all unassigned ones would bid the
same price on the same column and the lowest would win: one of them bidding does the same.
They are a count (``virtual``), not entries: the queue holds the unassigned real rows and,
while the count is positive, one virtual bidder (row id n), and columns they hold have owner
n. This keeps the queue at n + 1 slots and a round at most n + 1 bids when m >> n.

Progress: an increment below half the ulp of the price would leave it unchanged; the price
then steps to the next float instead. A bid that is not finite (overflow, NaN cost) stops
the problem before its round is applied, as does the cap ``max_bids`` on the bids counted
(when a round's bidders exceed the bids left, the first rows of the queue bid, as many as
are left): the unassigned real rows then take, in increasing order, the columns no real row
holds, in increasing order (always an injection), and the reported epsilon is +inf.

A CTA barrier (``tl.debug_barrier``) separates every global store from a later load of the
same buffer by another warp (the read-back), and every load from a later store (the
overwrite): the interpreter runs a program's warps in lockstep and cannot show a missing one;
tests/test_triton_compile.py checks the compiled code. The atomics are relaxed and CTA-scoped:
only this program touches its problem's buffers, and the barrier after them orders them
before the loads of the next pass.

References: D. P. Bertsekas, "The auction algorithm: a distributed relaxation method for the
assignment problem", Annals of Operations Research 14 (1988) 105-123; D. P. Bertsekas and
D. A. Castanon, "Parallel synchronous and asynchronous implementations of the auction
algorithm", Parallel Computing 17 (1991) 707-732. Same contract as csrc/auction_cpu.cpp
(Gauss-Seidel); tests: tests/test_auction_triton.py (scipy's linear_sum_assignment, under
TRITON_INTERPRET=1 on the CPU), tests/test_triton_compile.py (the real compiler, sm_80/sm_90).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from eotfast.kernels._launch import launch, register_cap
from eotfast.kernels._tiles import load_cost_tile

# A @triton.jit function may read a module global only if it is a tl.constexpr.
NO_OWNER = tl.constexpr(-1)
NO_ROW = tl.constexpr(2**31 - 1)  # a column's winner before any bid: above every row
NO_KEY = tl.constexpr(-(2**63))  # a column's key before any bid: below every bid's key


@triton.jit
def _order_key(x):
    """int64 key with the order of the floats x: flipping the magnitude bits of negative
    floats makes their two's complement order the float order (-0.0 lands just below +0.0).
    Integer atomics then pick the highest bid exactly, in float32 and float64 alike."""
    if x.dtype == tl.float64:
        bits = x.to(tl.int64, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    else:
        bits32 = x.to(tl.int32, bitcast=True)
        key = tl.where(bits32 < 0, bits32 ^ 0x7FFFFFFF, bits32).to(tl.int64)
    return key


@triton.jit
def _next_float(x, UP: tl.constexpr):
    """The next float above (UP) or below x, for finite x: one step of the bit pattern, away
    from zero or toward it; from +-0 the smallest float of that sign."""
    if x.dtype == tl.float64:
        bits = x.to(tl.int64, bitcast=True)
        smallest = 1 if UP else -0x7FFFFFFFFFFFFFFF  # bit patterns of +-4.9e-324
    else:
        bits = x.to(tl.int32, bitcast=True)
        smallest = 1 if UP else -0x7FFFFFFF  # bit patterns of +-1.4e-45
    away = (bits >= 0) == UP  # the step moves away from zero
    bits = tl.where(x == 0, smallest, tl.where(away, bits + 1, bits - 1))
    return bits.to(x.dtype, bitcast=True)


@triton.jit
def _top_two(best_a, column_a, second_a, best_b, column_b, second_b):
    """Combines (smallest value, its column, second smallest value) of two disjoint sets of
    columns; ties go to the lower column, whose rival value is then the second."""
    a_first = (best_a < best_b) | ((best_a == best_b) & (column_a < column_b))
    best = tl.where(a_first, best_a, best_b)
    column = tl.where(a_first, column_a, column_b)
    second = tl.where(a_first, tl.minimum(second_a, best_b), tl.minimum(second_b, best_a))
    return best, column, second


@triton.jit
def _best_two(cost_ptr, prices_ptr, rows, real, m, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """w1, j1, w2 of a tile of rows (``real``: stored rows; the others have cost 0) over all
    columns: the smallest C + p, its column (lowest on ties), the smallest over the others."""
    inf = float("inf")
    w1 = tl.full((BLOCK_N,), inf, prices_ptr.dtype.element_ty)
    w2 = tl.full((BLOCK_N,), inf, prices_ptr.dtype.element_ty)
    j1 = tl.zeros((BLOCK_N,), tl.int32)
    for j0 in range(0, m, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_mask = cols < m
        cost, _ = load_cost_tile(cost_ptr, rows, real, cols, col_mask, m)
        price = tl.load(prices_ptr + cols, mask=col_mask, other=0.0)
        value = tl.where(col_mask[None, :], cost + price[None, :], inf)
        # The tile's smallest value and its first column (one reduction), then the smallest
        # of the others.
        tile_w1, tile_j1 = tl.min(value, axis=1, return_indices=True,
                                  return_indices_tie_break_left=True)  # fmt: skip
        others = tl.where(tl.arange(0, BLOCK_M)[None, :] == tile_j1[:, None], inf, value)
        tile_w2 = tl.min(others, axis=1)
        # The running values hold the lower columns: they keep ties.
        w1, j1, w2 = _top_two(w1, j1, w2, tile_w1, j0 + tile_j1, tile_w2)
    return w1, j1, w2


@triton.jit
def _place_bids(
    cost_ptr, prices_ptr, queue_ptr, slot_column_ptr, slot_bid_ptr, column_key_ptr,
    bidders, n, m, epsilon, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Pass 1: the bids of the first ``bidders`` queued rows, each stored in its slot and
    offered to its column's key. Returns how many are not finite (the round is then dropped)."""
    several_columns = (tl.zeros((), tl.int32) + m) > 1
    broken = tl.zeros((), tl.int32)
    for s0 in range(0, bidders, BLOCK_N):
        slots = s0 + tl.arange(0, BLOCK_N)
        active = slots < bidders
        rows = tl.load(queue_ptr + slots, mask=active, other=0)
        w1, j1, w2 = _best_two(cost_ptr, prices_ptr, rows, active & (rows < n), m,
                               BLOCK_N, BLOCK_M)  # fmt: skip
        w2 = tl.where(several_columns, w2, w1)
        price = tl.load(prices_ptr + j1, mask=active, other=0.0)
        raised = price + ((w2 - w1) + epsilon)
        # An increment below half the price's ulp rounds away: step to the next float, so
        # that every accepted bid raises a price and the phase ends.
        raised = tl.where(raised > price, raised, _next_float(price, True))
        # C + p overflowed, or a NaN cost: no finite price separates the rows.
        finite = (tl.abs(raised) < float("inf")) & (tl.abs(w1) < float("inf"))
        broken += tl.sum((active & (finite == 0)).to(tl.int32), axis=0)
        tl.store(slot_column_ptr + slots, j1, mask=active)
        tl.store(slot_bid_ptr + slots, raised, mask=active)
        tl.atomic_max(column_key_ptr + j1, _order_key(raised), mask=active & finite,
                      sem="relaxed", scope="cta")  # fmt: skip
    return broken


@triton.jit
def _pick_winners(
    queue_ptr, slot_column_ptr, slot_bid_ptr, column_key_ptr, column_winner_ptr, bidders,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Pass 2: the bidders that match their column's highest key offer their row; the
    column's winner is the lowest of them."""
    for s0 in range(0, bidders, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        active = slots < bidders
        rows = tl.load(queue_ptr + slots, mask=active, other=0)
        column = tl.load(slot_column_ptr + slots, mask=active, other=0)
        raised = tl.load(slot_bid_ptr + slots, mask=active, other=0.0)
        best = tl.load(column_key_ptr + column, mask=active, other=NO_KEY)
        highest = active & (_order_key(raised) == best)
        tl.atomic_min(column_winner_ptr + column, rows, mask=highest, sem="relaxed", scope="cta")


@triton.jit
def _settle(
    prices_ptr, owner_ptr, queue_ptr, slot_column_ptr, slot_bid_ptr, slot_next_ptr,
    column_key_ptr, column_winner_ptr, queued, bidders, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Pass 3: winners take their column at their bid; each of the ``queued`` slots leaves the
    row that bids next: a loser (or a row that did not bid: slots from ``bidders`` on) itself,
    the owner a winner displaced, or none (NO_OWNER)."""
    for s0 in range(0, queued, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        active = slots < queued
        bid = slots < bidders
        rows = tl.load(queue_ptr + slots, mask=active, other=0)
        column = tl.load(slot_column_ptr + slots, mask=bid, other=0)
        raised = tl.load(slot_bid_ptr + slots, mask=bid, other=0.0)
        won = bid & (tl.load(column_winner_ptr + column, mask=bid, other=NO_OWNER) == rows)
        previous = tl.load(owner_ptr + column, mask=won, other=NO_OWNER)
        tl.debug_barrier()  # the owners read above -> overwritten below (other warps' slots)
        tl.store(owner_ptr + column, rows, mask=won)
        tl.store(prices_ptr + column, raised, mask=won)
        # A column has one winner, which resets it for the next round. A loser of the same
        # column in a later tile then reads NO_ROW instead of the winner: it lost either way.
        tl.store(column_key_ptr + column, tl.full((BLOCK_S,), NO_KEY, tl.int64), mask=won)
        tl.store(column_winner_ptr + column, tl.full((BLOCK_S,), NO_ROW, tl.int32), mask=won)
        tl.store(slot_next_ptr + slots, tl.where(won, previous, rows), mask=active)
        tl.debug_barrier()  # owners and winners stored above -> read by the next tile


@triton.jit
def _requeue(queue_ptr, slot_next_ptr, queued, n, BLOCK_S: tl.constexpr):
    """Pass 4: the real rows left by the ``queued`` slots, compacted in slot order into the
    queue. Returns their count and the count of virtual rows among them (a virtual bidder
    that lost or did not bid, or a virtual owner displaced)."""
    real_left = tl.zeros((), tl.int32)
    virtual_left = tl.zeros((), tl.int32)
    for s0 in range(0, queued, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        active = slots < queued
        entries = tl.load(slot_next_ptr + slots, mask=active, other=NO_OWNER)
        real = (entries >= 0) & (entries < n)
        rank = real_left + tl.cumsum(real.to(tl.int32), axis=0) - 1
        tl.store(queue_ptr + rank, entries, mask=real)
        real_left += tl.sum(real.to(tl.int32), axis=0)
        virtual_left += tl.sum((entries == n).to(tl.int32), axis=0)
    return real_left, virtual_left


@triton.jit
def _assign_leftovers(assignment_ptr, owner_ptr, slot_column_ptr, n, m, rows_left, cols_left,
                      BLOCK_S: tl.constexpr):  # fmt: skip
    """After max_bids (or a non-finite bid) stopped a problem: the real rows without a column
    (assignment -1), in increasing order, take the columns no real row holds, in increasing
    order. Nothing when rows_left and cols_left are 0 (a finished problem)."""
    free_seen = tl.zeros((), tl.int32)
    for j0 in range(0, cols_left, BLOCK_S):
        cols = j0 + tl.arange(0, BLOCK_S)
        owners = tl.load(owner_ptr + cols, mask=cols < m, other=0)
        free = (cols < m) & ((owners < 0) | (owners >= n))
        rank = free_seen + tl.cumsum(free.to(tl.int32), axis=0) - 1
        tl.store(slot_column_ptr + rank, cols, mask=free & (rank < n))  # n slots are enough
        free_seen += tl.sum(free.to(tl.int32), axis=0)
    tl.debug_barrier()  # the free columns stored above -> read below
    given = tl.zeros((), tl.int32)
    for r0 in range(0, rows_left, BLOCK_S):
        rows = r0 + tl.arange(0, BLOCK_S)
        current = tl.load(assignment_ptr + rows, mask=rows < n, other=0)
        waiting = (rows < n) & (current < 0)
        rank = given + tl.cumsum(waiting.to(tl.int32), axis=0) - 1
        column = tl.load(slot_column_ptr + rank, mask=waiting, other=0)
        tl.debug_barrier()  # the assignment read above -> overwritten below
        tl.store(assignment_ptr + rows, column.to(tl.int64), mask=waiting)
        tl.debug_barrier()  # stored above -> read by the next tile
        given += tl.sum(waiting.to(tl.int32), axis=0)


@triton.jit
def auction_kernel(
    cost_ptr, prices_in_ptr,              # [B, n, m], [B, m] float32 or float64
    epsilon_start_ptr, epsilon_final_ptr, # [B], [B] cost's dtype
    assignment_ptr, prices_ptr,           # outputs [B, n] int64, [B, m] cost's dtype
    epsilon_ptr, n_bids_ptr,              # outputs [B] cost's dtype, [B] int64
    owner_ptr, column_key_ptr,            # scratch [B, m] int32, int64
    column_winner_ptr,                    # scratch [B, m] int32
    queue_ptr, slot_column_ptr,           # scratch [B, n + 1] int32, int32
    slot_bid_ptr, slot_next_ptr,          # scratch [B, n + 1] cost's dtype, int32
    n, m, scaling: tl.float64, max_bids,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,  # bid tiles: rows x columns
    BLOCK_S: tl.constexpr,                # slots or columns per step of the 1D passes
):  # fmt: skip
    problem = tl.program_id(0).to(tl.int64)  # axis 0: up to 2^31 - 1 problems
    cost_ptr += problem * n * m
    prices_in_ptr += problem * m
    prices_ptr += problem * m
    owner_ptr += problem * m
    column_key_ptr += problem * m
    column_winner_ptr += problem * m
    assignment_ptr += problem * n
    queue_ptr += problem * (n + 1)
    slot_column_ptr += problem * (n + 1)
    slot_bid_ptr += problem * (n + 1)
    slot_next_ptr += problem * (n + 1)
    dtype = prices_ptr.dtype.element_ty
    # The schedule's factor in the cost's dtype, as the other backends multiply (float64 in,
    # so that float64 problems get it exactly).
    scaling = (tl.zeros((), tl.float64) + scaling).to(dtype)
    epsilon_final = tl.load(epsilon_final_ptr + problem)
    epsilon = tl.maximum(tl.load(epsilon_start_ptr + problem), epsilon_final)

    for j0 in range(0, m, BLOCK_S):
        cols = j0 + tl.arange(0, BLOCK_S)
        tl.store(prices_ptr + cols, tl.load(prices_in_ptr + cols, mask=cols < m), mask=cols < m)
        tl.store(column_key_ptr + cols, tl.full((BLOCK_S,), NO_KEY, tl.int64), mask=cols < m)
        tl.store(column_winner_ptr + cols, tl.full((BLOCK_S,), NO_ROW, tl.int32), mask=cols < m)
    for r0 in range(0, n, BLOCK_S):
        rows = r0 + tl.arange(0, BLOCK_S)
        tl.store(assignment_ptr + rows, tl.full((BLOCK_S,), -1, tl.int64), mask=rows < n)

    n_bids = tl.zeros((), tl.int64)
    queued = tl.zeros((), tl.int32)  # rows waiting to bid, in queue[0 .. queued)
    healthy = queued == 0
    proceed = healthy
    while proceed:
        # A phase: every row unassigned (owners reset), the real rows queued in order, then
        # one virtual bidder (row id n) while virtual rows are unassigned.
        virtual = tl.zeros((), tl.int32) + (m - n)
        queued = n + (virtual > 0).to(tl.int32)
        for j0 in range(0, m, BLOCK_S):
            cols = j0 + tl.arange(0, BLOCK_S)
            tl.store(owner_ptr + cols, tl.full((BLOCK_S,), NO_OWNER, tl.int32), mask=cols < m)
        for s0 in range(0, queued, BLOCK_S):
            slots = s0 + tl.arange(0, BLOCK_S)
            tl.store(queue_ptr + slots, slots, mask=slots < queued)
        tl.debug_barrier()  # owners, queue (and the first phase's prices) -> the bids

        while (queued > 0) & (n_bids < max_bids) & healthy:
            # The first rows of the queue bid, as many as max_bids still allows: all of them
            # unless this is the last round.
            bidders = tl.minimum(queued.to(tl.int64), max_bids - n_bids).to(tl.int32)
            broken = _place_bids(cost_ptr, prices_ptr, queue_ptr, slot_column_ptr,
                                 slot_bid_ptr, column_key_ptr, bidders, n, m, epsilon,
                                 BLOCK_N, BLOCK_M)  # fmt: skip
            healthy = broken == 0
            # A round with a non-finite bid is not applied: the problem stops as it was.
            bidders = tl.where(healthy, bidders, 0)
            settled = tl.where(healthy, queued, 0)
            tl.debug_barrier()  # slots and keys -> pass 2
            _pick_winners(queue_ptr, slot_column_ptr, slot_bid_ptr, column_key_ptr,
                          column_winner_ptr, bidders, BLOCK_S)  # fmt: skip
            tl.debug_barrier()  # winners -> pass 3
            _settle(prices_ptr, owner_ptr, queue_ptr, slot_column_ptr, slot_bid_ptr,
                    slot_next_ptr, column_key_ptr, column_winner_ptr, settled, bidders,
                    BLOCK_S)  # fmt: skip
            real_left, virtual_left = _requeue(queue_ptr, slot_next_ptr, settled, n, BLOCK_S)
            # The virtual slot (if any) left the count; it comes back if it lost or did not
            # bid, as does every virtual owner displaced by a real row.
            virtual_after = virtual - (virtual > 0).to(tl.int32) + virtual_left
            tl.store(queue_ptr + real_left, n, mask=healthy & (virtual_after > 0))
            virtual = tl.where(healthy, virtual_after, virtual)
            queued = tl.where(healthy, real_left + (virtual_after > 0).to(tl.int32), queued)
            n_bids += bidders.to(tl.int64)
            tl.debug_barrier()  # queue, owners, prices -> the next round's bids

        proceed = (queued == 0) & (epsilon > epsilon_final)
        smaller = epsilon * scaling
        # A scaling within an ulp of 1 would round epsilon * scaling back to epsilon forever.
        smaller = tl.where(smaller < epsilon, smaller, _next_float(epsilon, False))
        epsilon = tl.where(proceed, tl.maximum(smaller, epsilon_final), epsilon)

    # The assignment from the owners; a stopped problem (rows still queued) fills its gaps.
    for j0 in range(0, m, BLOCK_S):
        cols = j0 + tl.arange(0, BLOCK_S)
        owners = tl.load(owner_ptr + cols, mask=cols < m, other=NO_OWNER)
        tl.store(assignment_ptr + owners, cols.to(tl.int64),
                 mask=(cols < m) & (owners >= 0) & (owners < n))  # fmt: skip
    tl.debug_barrier()  # the assignment stored above -> read by the gap filling
    stopped = queued > 0
    _assign_leftovers(assignment_ptr, owner_ptr, slot_column_ptr, n, m,
                      tl.where(stopped, n, 0), tl.where(stopped, m, 0), BLOCK_S)  # fmt: skip
    tl.store(epsilon_ptr + problem, tl.where(stopped, float("inf"), epsilon_final).to(dtype))
    tl.store(n_bids_ptr + problem, n_bids)


def launch_auction(
    cost, prices, epsilon_start, epsilon_final, scaling: float, max_bids: int, *,
    block_n: int = 4,    # 4 x 256 bid tiles: a round's bidders are few after the first rounds
    block_m: int = 256,  # of a phase, so few rows per tile waste few lanes; not tuned on a GPU
    block_s: int = 256,
    num_warps: int = 4,
    maxnreg: int = 128,
):  # fmt: skip
    """Launcher of :func:`auction_kernel` on contiguous [B, n, m] costs (n <= m, float32 or
    float64), initial prices [B, m] and epsilons [B] of the same dtype; one launch, one
    program per problem. Returns (assignment [B, n] int64, prices [B, m], epsilon [B],
    n_bids [B] int64) as the op's schema says."""
    batch, n, m = cost.shape
    if m >= 2**31 - 1:
        raise ValueError(f"launch_auction: m must be below 2^31 - 1 (int32 rows), got {m}")
    device, dtype = cost.device, cost.dtype
    assignment = torch.empty((batch, n), dtype=torch.int64, device=device)
    prices_out = torch.empty((batch, m), dtype=dtype, device=device)
    epsilon = torch.empty((batch,), dtype=dtype, device=device)
    n_bids = torch.empty((batch,), dtype=torch.int64, device=device)
    owner = torch.empty((batch, m), dtype=torch.int32, device=device)
    column_key = torch.empty((batch, m), dtype=torch.int64, device=device)
    column_winner = torch.empty((batch, m), dtype=torch.int32, device=device)
    queue = torch.empty((batch, n + 1), dtype=torch.int32, device=device)
    slot_column = torch.empty((batch, n + 1), dtype=torch.int32, device=device)
    slot_bid = torch.empty((batch, n + 1), dtype=dtype, device=device)
    slot_next = torch.empty((batch, n + 1), dtype=torch.int32, device=device)
    launch(auction_kernel, (batch,), device)(
        cost, prices, epsilon_start, epsilon_final, assignment, prices_out, epsilon, n_bids,
        owner, column_key, column_winner, queue, slot_column, slot_bid, slot_next,
        n, m, scaling, max_bids,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_S=block_s, num_warps=num_warps,
        **register_cap(maxnreg),
    )  # fmt: skip
    return assignment, prices_out, epsilon, n_bids
