"""Backend 'torch': the pure-PyTorch reference of every op, on any device; the oracle of the
other backends' tests and the fallback where no kernel runs."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from eotfast.ops.common import (
    PROBE_ROUNDS,
    SLOW_RATE,
    STALL_CHECK_ROUNDS,
    auction_op,
    check_auction_arguments,
    check_auction_values,
    check_sinkhorn_arguments,
    check_sinkhorn_values,
    sinkhorn_op,
)

__all__ = [
    "auction",
    "auction_torch",
    "cost_matrix",
    "draw_from_log_weights",
    "draw_partners",
    "sinkhorn",
    "sinkhorn_torch",
]


def cost_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j||^2 = |x_i|^2 + |y_j|^2 - 2 x_i.y_j through one matrix product (the GEMM
    form: cuBLAS / MKL), clamped at 0 where rounding makes it negative: x [B, n, d] and
    y [B, m, d] -> [B, n, m] in the inputs' dtype, float32 for half inputs (their squared
    norms lose too many digits at image dimensions, d >= 3072)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    # vector_norm reads x once, where x.square().sum(-1) writes and reads an [n, d] square;
    # baddbmm adds the norms in the GEMM's epilogue instead of three passes over [n, m].
    # Measured at n = m = 1024, d = 3072, float32, 2 threads: 116 ms against 147 ms on a
    # loaded 2-core CPU (the GEMM alone: 84 ms).
    x_sq = torch.linalg.vector_norm(x, dim=-1).square()  # [B, n]
    y_sq = torch.linalg.vector_norm(y, dim=-1).square()  # [B, m]
    norms = x_sq[..., :, None] + y_sq[..., None, :]  # [B, n, m]
    return torch.baddbmm(norms, x, y.mT, alpha=-2).clamp_min_(0)


def sinkhorn_reference(
    cost, a, b, epsilon, max_iter: int, tol: float, epsilon_start=None, scaling: float = 0.5,
    relaxation: float = 1.0, reach: float = math.inf,
):  # fmt: skip
    """Pure-PyTorch log-domain Sinkhorn on [B, n, m] problems: the oracle of the other backends.

    Same iteration and stopping rule as the compiled kernels and as POT's ``sinkhorn_log``
    (g update, then f update; then the error of the plan P = exp((f + g - C) / epsilon),
    sqrt(||P 1 - a||^2 + ||P^T 1 - b||^2), whose first term is 0 up to rounding without
    over-relaxation). Each problem freezes once its error is below `tol`. On CPU tensors the
    loop also ends when all problems have stopped; on a GPU it runs `max_iter` iterations
    (frozen problems stay frozen), because ending early would need the host to read a device
    value.

    Epsilon scaling (Kosowsky & Yuille, 1994; Schmitzer, 2019, sec. 3.2): iteration k runs at
    epsilon_k = max(epsilon, epsilon_start * scaling**k), carrying f and g over, and the error
    after it is that of the plan at the next iteration's epsilon, so that a problem stops only
    on the plan at the target epsilon. If max_iter ends the run before epsilon_k reaches the
    target, the error is inf: the potentials are not those of the requested problem.
    ``epsilon_start=None`` (or = epsilon) is the plain iteration.

    Over-relaxation (Thibault, Chizat, Dossal & Papadakis, 2021; Lehmann, von Renesse, Sambale
    & Uschmajew, 2022): at the target epsilon each update is g <- (1 - w) g + w G(f), then
    f <- (1 - w) f + w F(g), with w = ``relaxation`` in [1, 2); same fixed point, 1 is plain.
    Over-relaxation also amplifies rounding noise near the fixed point (in float32 at epsilon
    = 1e-3 std(cost) on image costs its error stalled at 9e-4, where the plain iteration
    reaches 1e-4): a problem whose error has not decreased over the last STALL_CHECK_ROUNDS
    iterations at the target goes on with the plain iteration; and a problem that converges
    fast without it never starts (PROBE_ROUNDS, SLOW_RATE).

    Unbalanced OT (``reach`` = rho < inf; Chizat, Peyré, Schmitzer & Vialard, 2018): the
    marginal constraints become penalties rho KL(P 1 | a) + rho KL(P^T 1 | b) and the entropy is
    taken relative to a (x) b; each update is f = epsilon (log a - lambda LSE_j(...)), the
    log-sum-exp damped by lambda = rho / (rho + epsilon_k). Its fixed point has P 1 = a e^(-F/rho)
    and P^T 1 = b e^(-G/rho), F = f - epsilon log a, G = g - epsilon log b, so the error
    measures the plan's marginals against those (a and b when balanced: e^(-0) = 1).
    """
    if epsilon_start is None:
        epsilon_start = epsilon
    batch, n, m = cost.shape
    log_a, log_b = a.log(), b.log()
    f = cost.new_zeros(batch, n)
    g = cost.new_zeros(batch, m)
    n_iter = torch.zeros(batch, dtype=torch.int64, device=cost.device)
    error = torch.full((batch,), float("inf"), dtype=cost.dtype, device=cost.device)
    active = torch.ones(batch, dtype=torch.bool, device=cost.device)
    eps_next = torch.maximum(epsilon, epsilon_start)  # [B] epsilon of iteration 0
    relaxing = torch.ones(batch, dtype=torch.bool, device=cost.device)  # slow, not stalled
    checkpoint = torch.full_like(error, float("inf"))  # error at the last stall check
    target_rounds = torch.zeros_like(n_iter)  # iterations measured at the target epsilon
    probe_error = torch.full_like(error, float("inf"))  # error after PROBE_ROUNDS // 2
    for k in range(max_iter):
        eps = eps_next[:, None]  # [B, 1]
        eps_next = torch.maximum(epsilon, epsilon_start * scaling ** (k + 1))
        relaxed = (eps[:, 0] <= epsilon) & relaxing & (target_rounds >= PROBE_ROUNDS)
        w = torch.where(relaxed, relaxation, 1.0).to(cost.dtype)[:, None]  # [B, 1]
        damping = 1 / (1 + eps / reach)  # [B, 1]; 1 when balanced (reach = inf)
        lse = torch.logsumexp((f[:, :, None] - cost) / eps[..., None], dim=1)
        g_new = eps * (log_b - damping * lse)
        g = torch.where(active[:, None], relax(g, g_new, w), g)
        lse = torch.logsumexp((g[:, None, :] - cost) / eps[..., None], dim=2)
        f_new = eps * (log_a - damping * lse)
        f = torch.where(active[:, None], relax(f, f_new, w), f)
        plan = ((f[:, :, None] + g[:, None, :] - cost) / eps_next[:, None, None]).exp()
        # In float64: squared violations of a plan of total mass 1e30 overflow float32 (the error
        # read inf), those of mass 1e-30 underflow (it read 0).
        row_violation = plan.sum(dim=2) - fixed_point_mass(a, f, eps_next[:, None], reach)
        column_violation = plan.sum(dim=1) - fixed_point_mass(b, g, eps_next[:, None], reach)
        row_violation, column_violation = row_violation.double(), column_violation.double()
        violation = torch.cat([row_violation, column_violation], dim=1)
        violation = torch.linalg.vector_norm(violation, dim=-1).to(cost.dtype)
        annealed = eps_next <= epsilon
        violation = torch.where(annealed, violation, torch.full_like(violation, float("inf")))
        error = torch.where(active, violation, error)
        n_iter += active
        target_rounds += active & annealed
        probe_error = torch.where(target_rounds == PROBE_ROUNDS // 2, error, probe_error)
        fast = error < probe_error * SLOW_RATE ** (PROBE_ROUNDS // 2)
        relaxing = relaxing & ~((target_rounds == PROBE_ROUNDS) & fast)
        stall_check = active & (target_rounds > PROBE_ROUNDS) & (n_iter % STALL_CHECK_ROUNDS == 0)
        relaxing = relaxing & ~(stall_check & ~(error < checkpoint))
        checkpoint = torch.where(stall_check, error, checkpoint)
        active = active & ~(error < tol)
        if cost.device.type == "cpu" and not bool(active.any()):
            break
    return f, g, n_iter, error


def fixed_point_mass(marginal, potential, epsilon, reach: float):
    """What the plan's rows (or columns) sum to at the fixed point: the marginal, times
    e^(-F / reach) with F = potential - epsilon log marginal when unbalanced (0 where the
    marginal is: its potential is -inf)."""
    if math.isinf(reach):
        return marginal
    relative = potential - epsilon * marginal.log()
    return torch.where(marginal > 0, marginal * torch.exp(-relative / reach), 0.0)


def relax(old: torch.Tensor, new: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(1 - w) old + w new, and new itself where either is -inf (a point of zero mass) or w
    is 1: 0 * -inf would be NaN."""
    mixed = (1 - w) * old + w * new
    plain = (w == 1) | ~torch.isfinite(old) | ~torch.isfinite(new)
    return torch.where(plain, new, mixed)


@sinkhorn_op()
def sinkhorn_torch(
    cost: Tensor, a: Tensor, b: Tensor, epsilon: Tensor, max_iter: int, tol: float,
    epsilon_start: Tensor, scaling: float, relaxation: float, reach: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The reference as an op, on any device."""
    check_sinkhorn_arguments(
        "sinkhorn_torch", cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling,
        relaxation, reach,
    )  # fmt: skip
    check_sinkhorn_values("sinkhorn_torch", cost, a, b, epsilon, epsilon_start, reach)
    return sinkhorn_reference(
        cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling, relaxation, reach
    )


sinkhorn = sinkhorn_torch


def draw_from_log_weights(
    log_weights: torch.Tensor, sampling: str, generator: torch.Generator | None
) -> torch.Tensor:
    """One column per row of [..., n, m] unnormalized log-weights: drawn with probability
    proportional to exp(log_weights) ("sample", by the Gumbel-max trick: argmax of
    log_weights + Gumbel noise), or the most likely one ("argmax")."""
    if sampling == "argmax":
        return log_weights.argmax(dim=-1)
    uniform = torch.rand(
        log_weights.shape, generator=generator, dtype=log_weights.dtype, device=log_weights.device
    )
    # Clamp keeps log(0) out: the smallest normal float still yields a finite Gumbel draw.
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
    return (log_weights + gumbel).argmax(dim=-1)


def draw_partners(cost, g, epsilon, sampling: str, generator) -> torch.Tensor:
    """A partner per row of the plan exp((f_i + g_j - C_ij) / epsilon) of [B, n, m] problems:
    row i is proportional to exp((g_j - C_ij) / epsilon) (f_i is constant on a row)."""
    log_weights = (g[..., None, :] - cost) / epsilon[..., None, None]
    return draw_from_log_weights(log_weights, sampling, generator)


# ----------------------------------------------------------------------------------- auction
# Rounds between the host's checks for unfinished problems of the torch auction off the CPU.
AUCTION_POLL_ROUNDS = 64


def auction_reference(
    cost, prices, epsilon_start, epsilon_final, scaling: float, max_bids: int, *, compact=None
):
    """Pure-PyTorch forward auction with epsilon scaling on [B, n, m] problems (n <= m), Jacobi
    bidding vectorized over the batch and the rows: the reference of the auction ops
    (contract: eotfast.ops.common.AUCTION_SCHEMA), checked against scipy.

    The problem is padded to m x m by m - n virtual rows of cost 0, never stored: all of them
    make the same bid, and the column goes to the lowest bidder on ties, so one virtual bidder
    per round (row id n, after every real row) does what they would do together. A round:
    every unassigned row of every unfinished problem bids
    ``p_j1 + (w2 - w1) + epsilon`` on its best column j1 (w1, w2 the two smallest C_ij + p_j,
    the lowest j on ties; the increment at least the ulp of w1, and the bid at least the next
    float above p_j1, so that every bid is seen in C + p); each column that received bids
    takes the highest one (ties to the lowest row) and drops its previous owner. A phase ends
    when every column is owned; the next runs at max(epsilon_final, epsilon * scaling) from
    the same prices with every row unassigned, and the problem finishes after the phase at
    epsilon_final. Each problem counts its own bids and stops on its own.

    max_bids: when a round's bidders exceed the bids left, only the first (lowest rows) bid;
    a problem out of bids, or with a bid that is not finite, stops: its unassigned real rows
    take the columns no real row holds, in increasing order (still an injection), and its
    epsilon is +inf. An unfinished problem makes at least one bid per round, so max_bids
    rounds settle every problem: on CPU tensors the loop ends as soon as all problems have
    finished; on other devices the host reads whether any problem is left every AUCTION_POLL_ROUNDS
    rounds (a sync each; finished problems stay frozen meanwhile, so the result is the same).

    compact: scan only the bidders' cost rows (their indices read by the host, so CPU tensors
    only: the default there) instead of every row with a mask (the default elsewhere, no sync).
    Both give the same result (tests/test_auction.py); it is a parameter for that test.
    """
    batch, n, m = cost.shape
    device, dtype = cost.device, cost.dtype
    on_cpu = device.type == "cpu"
    compact = on_cpu if compact is None else compact
    inf = torch.tensor(float("inf"), dtype=dtype, device=device)
    # A round's cost is its number of tensor ops (at n = 128 each takes 5-15 us on a CPU core,
    # whatever its size), and at n = 1024 the scan of the whole [n, m] cost: the version that
    # formed C + p for every row, took min and a second amin over it and resolved the columns
    # with ~45 ops took 0.64 ms a round at n = 128 (1027 rounds on 2-D points: 0.91 s) and
    # 2.5 ms at n = 1024 (the min over 10^6 entries alone 1.9 ms, topk 3.5 ms). So the state
    # is flat ([B * m] prices and owners, one row of cost per bidder slot), the bidders' rows
    # are gathered (on CPU tensors: the tail of a phase has 1-10 bidders), and the phase
    # bookkeeping runs only in rounds that complete a phase.
    virtual = m > n  # padding rows exist: one virtual bidder slot per problem, of cost 0
    slots = n + 1 if virtual else n  # bidder slots per problem: real rows, then the virtual one
    rows = cost.reshape(batch, n, m)
    if virtual:
        rows = torch.cat([rows, rows.new_zeros(batch, 1, m)], dim=1)
    rows = rows.reshape(batch * slots, m)  # slot s of problem b: rows[b * slots + s]
    prices = prices.reshape(-1).clone()  # [B * m] (a copy: the input is not modified)
    owner = torch.full((batch * m,), -1, dtype=torch.int64, device=device)  # n: virtual
    epsilon = torch.maximum(epsilon_start, epsilon_final)  # [B] epsilon of the running phase
    n_bids = torch.zeros(batch, dtype=torch.int64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    problem_of_slot = torch.arange(batch, device=device).repeat_interleave(slots)
    slot_index = torch.arange(slots, device=device).repeat(batch)
    column_base = torch.arange(batch, device=device) * m
    no_row = slots + 1
    most_bids = 0  # on the host, compact: at least every problem's n_bids (no op to read it)
    for round_ in range(max_bids):
        # Rows holding a column: owners scattered into [B, slots + 1] (-1 on the last slot).
        held = torch.zeros(batch, slots + 1, dtype=torch.bool, device=device)
        held.scatter_(1, owner.view(batch, m) % (slots + 1), True)
        bidder = ~held[:, :slots]
        if virtual:  # the virtual slot bids while some virtual row holds no column
            bidder[:, n] = (owner.view(batch, m) == n).sum(1) < m - n
        bidder &= active[:, None]
        if not compact or most_bids + slots > max_bids:  # the first rows bid
            bidder &= bidder.cumsum(1) <= (max_bids - n_bids)[:, None]
        if compact:  # the bidders only
            slot = bidder.view(-1).nonzero().squeeze(1)
            most_bids += slot.numel()
            valid = None
        else:  # every slot, the others masked
            slot = torch.arange(batch * slots, device=device)
            valid = bidder.view(-1)
        b, i = problem_of_slot[slot], slot_index[slot]
        value = rows.index_select(0, slot) + prices.view(batch, m).index_select(0, b)
        w1, j1 = value.min(dim=1)  # first minimum: the lowest column on ties
        w2 = value.scatter(1, j1[:, None], float("inf")).amin(dim=1) if m > 1 else w1
        key = column_base[b] + j1  # [K] the bid's column in the flat [B * m] state
        old = prices[key]
        # At least the ulp of w1: a smaller rise of p_j1 may not change C_ij1 + p_j1 at all
        # (epsilon below the resolution of C + p), and rows tied there would trade the
        # column up one price ulp a round. Epsilon then acts as that ulp, which the rounding
        # of C + p costs the bound anyway.
        magnitude = w1.abs()
        resolution = torch.nextafter(magnitude, inf.expand_as(w1)) - magnitude
        bid = old + torch.maximum((w2 - w1) + epsilon[b], resolution)
        # An increment below half the price's ulp rounds away: the next float instead.
        bid = torch.where(bid > old, bid, torch.nextafter(old, inf.expand_as(old)))
        # A bid that is not finite (C + p overflowed, or a NaN cost): the problem stops.
        if compact and bool(torch.isfinite(bid).all()) and bool(torch.isfinite(w1).all()):
            healthy = None
        else:
            bad = ~(torch.isfinite(bid) & torch.isfinite(w1))
            if valid is not None:
                bad &= valid
            sick = torch.zeros(batch, dtype=torch.int64, device=device)
            healthy = sick.index_add_(0, b, bad.long()) == 0  # [B]
            bidder &= healthy[:, None]
            valid = healthy[b] if valid is None else valid & healthy[b]
        if valid is None and key.numel() == 1:
            # One bidder in the whole batch (the tail of a phase: most rounds on 2-D points,
            # 750 of 1064 at n = 128): its column is its own, no resolution among bidders.
            prices[key] = bid
            owner[key] = i
            n_bids[b] += 1
        else:  # each column takes its highest bid, ties to the lowest row
            offer = bid if valid is None else torch.where(valid, bid, -inf)
            best = torch.full_like(prices, -inf).scatter_reduce(0, key, offer, "amax")
            top = offer == best[key]
            if valid is not None:
                top &= valid
            candidate = torch.where(top, i, no_row)
            winner = torch.full_like(owner, no_row).scatter_reduce(0, key, candidate, "amin")
            won = winner < no_row  # [B * m] columns that received a bid
            prices = torch.where(won, best, prices)
            owner = torch.where(won, winner, owner)
            n_bids += bidder.sum(1)
        # A complete phase: the last one finishes the problem, another starts the next.
        complete = active & (owner >= 0).view(batch, m).all(1)
        if not on_cpu or bool(complete.any()):
            done = complete & ~(epsilon > epsilon_final)
            advance = complete & ~done
            smaller = epsilon * scaling
            # A scaling within an ulp of 1 would round epsilon * scaling back to epsilon forever.
            below = torch.nextafter(epsilon, torch.zeros_like(epsilon))
            smaller = torch.where(smaller < epsilon, smaller, below)
            epsilon = torch.where(advance, torch.maximum(epsilon_final, smaller), epsilon)
            owner = torch.where(advance.repeat_interleave(m), -1, owner)
            finished |= done
            active &= ~done
        if healthy is not None:
            active &= healthy
        active &= n_bids < max_bids
        # Out of bids (or unhealthy) before the last phase completed: stopped, epsilon inf.
        # On CPU tensors the loop ends once all problems have; elsewhere the host looks every
        # AUCTION_POLL_ROUNDS rounds (one sync each): this reference is the fallback where no
        # kernel runs (MPS, or CUDA without Triton), and max_bids rounds of it (10^4 m by
        # default) would not end in practice. The pairing path on CUDA takes the Triton kernel.
        poll = on_cpu or (round_ + 1) % AUCTION_POLL_ROUNDS == 0
        if poll and not bool(active.any()):
            break
    # Columns of the real rows; a stopped problem's unassigned rows take the free columns.
    owner = owner.view(batch, m)
    prices = prices.view(batch, m)
    real_owner = torch.where((owner >= 0) & (owner < n), owner, n)
    assignment = torch.full((batch, n + 1), -1, dtype=torch.int64, device=device)
    assignment.scatter_(1, real_owner, torch.arange(m, device=device).expand(batch, m))
    assignment = assignment[:, :n]
    unassigned = assignment < 0
    free = torch.argsort((real_owner < n).to(torch.int8), dim=1, stable=True)  # free first
    rank = (unassigned.cumsum(1) - 1).clamp_min(0)
    assignment = torch.where(unassigned, free.gather(1, rank), assignment)
    epsilon = torch.where(finished, epsilon_final, inf)
    return assignment, prices, epsilon, n_bids


@auction_op()
def auction_torch(
    cost: Tensor, prices: Tensor, epsilon_start: Tensor, epsilon_final: Tensor, scaling: float,
    max_bids: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The reference as an op, on any device."""
    check_auction_arguments(
        "auction_torch", cost, prices, epsilon_start, epsilon_final, scaling, max_bids
    )
    check_auction_values("auction_torch", cost, prices, epsilon_start, epsilon_final)
    return auction_reference(cost, prices, epsilon_start, epsilon_final, scaling, max_bids)


auction = auction_torch
