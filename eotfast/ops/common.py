"""What every backend's ops share: the result types, the epsilon rule, the over-relaxation
rule's constants, and per op schema (Sinkhorn, auction) its metadata checks, its fake (output
allocator) and the decorator that registers a backend's implementation under it. Nothing here
imports a backend."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from eotfast._validation import (
    EPSILON_HEADROOM,
    check_finite_values,
    check_marginal_values,
    check_same_device,
    check_tensor,
    values_checkable,
)

__all__ = [
    "AUCTION_SCHEMA",
    "PROBE_ROUNDS",
    "SINKHORN_SCHEMA",
    "SLOW_RATE",
    "SOLVER_DTYPES",
    "STALL_CHECK_ROUNDS",
    "AuctionResult",
    "SinkhornResult",
    "auction_op",
    "broadcast_marginal",
    "check_auction_arguments",
    "check_cost_batch",
    "check_point_batch_arguments",
    "check_sinkhorn_arguments",
    "check_auction_values",
    "check_sinkhorn_values",
    "empty_auction_solution",
    "empty_sinkhorn_solution",
    "epsilon_from_reg",
    "require_balanced",
    "require_dtype",
    "sinkhorn_op",
]

# The dtypes a Sinkhorn op solves in; others (float16, bfloat16) are solved in float32.
SOLVER_DTYPES = (torch.float32, torch.float64)

# The over-relaxation rule of every Sinkhorn backend (torch_backend.sinkhorn_reference states
# it; kernels/sinkhorn.py imports these; csrc/sinkhorn_math.h holds the C++ copies, kept equal
# by tests/test_sinkhorn.py::test_relaxation_constants_agree).
# Every STALL_CHECK_ROUNDS iterations at the target epsilon, a problem whose marginal error has
# not decreased since the last check stops over-relaxing.
STALL_CHECK_ROUNDS = 32
# Over-relaxation pays only where the plain iteration is slow: each problem first makes
# PROBE_ROUNDS plain iterations at the target, and relaxes only if its error fell by less than
# SLOW_RATE per iteration over the second half of them (the first half lets the transient
# after the annealing pass: measured over rounds 4-8, it turned relaxation off on image costs
# at n = 1024 and left 1008 iterations where 210 were enough). Measured with backend "cpu": a
# 6 x 5 problem at epsilon = std(cost) converged to 1e-6 in under 20 plain iterations and took
# 131 relaxed ones (w = 1.9 contracts by about w - 1 per iteration), while image costs at
# n = 1024 contract by 0.993 per plain iteration.
PROBE_ROUNDS = 16
SLOW_RATE = 0.8


class SinkhornResult(NamedTuple):
    """Output of :func:`eotfast.sinkhorn`; leading dimensions are those of the cost matrix.

    The plan is not stored (it is as large as the cost); :meth:`plan` and :meth:`log_plan`
    rebuild it from the potentials.
    """

    # [..., n] row (source) and [..., m] column (target) potentials, in cost units; float64
    # from eotfast.sinkhorn whatever the cost's dtype (see there: g holds the cost's offset)
    f: torch.Tensor
    g: torch.Tensor
    epsilon: torch.Tensor  # [...] absolute regularization used, in the solve dtype
    n_iter: torch.Tensor  # [...] int64, iterations done (g update + f update each)
    # [...] sqrt(||P 1 - a||^2 + ||P^T 1 - b||^2) of the returned plan
    marginal_error: torch.Tensor

    def log_plan(self, cost: torch.Tensor) -> torch.Tensor:
        """log P = (f_i + g_j - C_ij) / epsilon, shape [..., n, m], formed in the potentials'
        precision and returned in epsilon's (the solve dtype); ``cost`` is the one solved."""
        expected = (*self.f.shape, self.g.shape[-1])  # [..., n, m]
        if not isinstance(cost, torch.Tensor) or tuple(cost.shape) != expected:
            got = tuple(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__
            raise ValueError(f"cost must be the solved cost, of shape {expected}, got {got}")
        epsilon = self.epsilon[..., None, None]
        log_plan = (self.f[..., :, None] + self.g[..., None, :] - cost) / epsilon
        return log_plan.to(self.epsilon.dtype)

    def plan(self, cost: torch.Tensor) -> torch.Tensor:
        """The transport plan P, shape [..., n, m]; rows sum to a, columns to b up to the error."""
        return self.log_plan(cost).exp()


class AuctionResult(NamedTuple):
    """Output of :func:`eotfast.auction`; leading dimensions are those of the cost matrix."""

    assignment: torch.Tensor  # [..., n] int64, column of each row, distinct within a problem
    prices: torch.Tensor  # [..., m] final column prices (dual variables, cost units)
    epsilon: torch.Tensor  # [...] epsilon of the last phase; inf where max_bids stopped it
    n_bids: torch.Tensor  # [...] int64, bids made
    bound: torch.Tensor  # [...] m * epsilon: total cost minus the optimum is at most this


def epsilon_from_reg(cost: torch.Tensor, reg: float, relative_reg: bool) -> torch.Tensor:
    """Absolute epsilon per problem, shape cost.shape[:-2].

    Relative (default): epsilon = reg * std(cost) over each problem's n x m entries, the
    convention of OTT-JAX. Raw image costs (d = 3072 and up) are in the thousands and tightly
    concentrated, so an absolute reg such as 0.05 is tiny next to their spread; measured here,
    that setting makes non-log Sinkhorn underflow to a uniform plan. A problem whose costs are
    all equal (std 0) gets epsilon = reg: every plan is optimal for it.
    """
    batch_shape = cost.shape[:-2]
    if not relative_reg:
        # Through float64: a reg beyond the dtype's range becomes inf, which the range check
        # names, where torch.full would raise an overflow error about a "value".
        return torch.full(batch_shape, reg, dtype=torch.float64, device=cost.device).to(cost.dtype)
    std = cost.flatten(-2).std(dim=-1, correction=0)
    return reg * torch.where(std > 0, std, torch.ones_like(std))


def empty_sinkhorn_solution(
    cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling, relaxation, reach
):
    """Outputs of a Sinkhorn op on [B, n, m] problems, unfilled: f [B, n], g [B, m] and the
    error [B] in cost's dtype, n_iter [B] int64. The fake of every Sinkhorn op whose outputs
    follow cost's dtype, and the allocator of the C++ one."""
    batch, n, m = cost.shape
    return (
        cost.new_empty(batch, n),
        cost.new_empty(batch, m),
        cost.new_empty(batch, dtype=torch.int64),
        cost.new_empty(batch),
    )


# The one schema of every backend's Sinkhorn op: cost [B, n, m], a [B, n], b [B, m], epsilon [B],
# epsilon_start [B], scaling, relaxation -> f [B, n], g [B, m], n_iter [B] int64,
# marginal_error [B]. Epsilon scaling: iteration k runs at max(epsilon, epsilon_start *
# scaling**k), and a problem may stop (error < tol) only once that is epsilon; epsilon_start =
# epsilon turns it off. At the target epsilon each potential update is over-relaxed by
# `relaxation` in [1, 2) (1: plain Sinkhorn). `reach` is rho > 0 of unbalanced OT (every update
# damped by rho / (rho + epsilon)); inf: balanced.
SINKHORN_SCHEMA = (
    "(Tensor cost, Tensor a, Tensor b, Tensor epsilon, int max_iter, float tol,"
    " Tensor epsilon_start, float scaling, float relaxation, float reach)"
    " -> (Tensor, Tensor, Tensor, Tensor)"
)


def check_tensors_like_cost(op: str, cost: torch.Tensor, **tensors) -> None:
    """Each ``name=(tensor, shape)`` has that shape, cost's dtype and cost's device: the op
    hands its data pointer to a kernel that reads ``shape`` elements of cost's dtype."""
    for name, (tensor, shape) in tensors.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{op}: {name} must have shape {shape} for cost of shape {tuple(cost.shape)}, "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.dtype != cost.dtype:
            raise TypeError(f"{op}: {name} must have cost's dtype {cost.dtype}, got {tensor.dtype}")
        if tensor.device != cost.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but cost is on {cost.device}")


def check_cost_batch(op: str, cost) -> tuple[int, int, int]:
    """A non-empty [B, n, m] cost; returns (B, n, m)."""
    if cost.dim() != 3 or cost.numel() == 0:
        raise ValueError(
            f"{op}: cost must be a non-empty [B, n, m] tensor, got {tuple(cost.shape)}"
        )
    return tuple(cost.shape)


def check_sinkhorn_arguments(
    op: str, cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling, relaxation, reach
) -> None:
    """Shapes, dtypes and devices of a Sinkhorn op's arguments: the ops are public
    (torch.ops.eotfast.sinkhorn_cpu, ...) and pass data pointers to kernels, which must never
    read past a buffer. Metadata only: no device sync, and the fakes run it too."""
    batch, n, m = check_cost_batch(op, cost)
    check_tensors_like_cost(
        op, cost,
        a=(a, (batch, n)), b=(b, (batch, m)),
        epsilon=(epsilon, (batch,)), epsilon_start=(epsilon_start, (batch,)),
    )  # fmt: skip
    if max_iter < 1:
        raise ValueError(f"{op}: max_iter must be >= 1, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"{op}: tol must be a number >= 0, got {tol}")
    if not 0 < scaling < 1:
        raise ValueError(f"{op}: scaling must be a number in (0, 1), got {scaling}")
    if not 1 <= relaxation < 2:
        raise ValueError(f"{op}: relaxation must be a number in [1, 2), got {relaxation}")
    if not reach > 0:
        raise ValueError(f"{op}: reach must be a number > 0 (inf: balanced), got {reach}")


def require_balanced(op: str, reach: float) -> None:
    """The GPU Sinkhorn kernels solve balanced problems only (their damped update is not
    written): an op that receives a finite reach says so instead of ignoring it."""
    if not math.isinf(reach):
        raise ValueError(
            f"{op}: reach={reach:g} (unbalanced OT) is not implemented by this kernel; use "
            "backend='torch' (any device) or 'cpu' (CPU tensors)"
        )


def require_dtype(op: str, dtypes: tuple[torch.dtype, ...], **tensors: torch.Tensor) -> None:
    """The kernels read each pointer with the dtype it was compiled for, and the fakes promise
    the real outputs' dtypes: inputs of any other dtype are rejected by both, with the
    argument's name."""
    for name, tensor in tensors.items():
        if tensor.dtype not in dtypes:
            expected = " or ".join(str(dtype) for dtype in dtypes)
            raise TypeError(f"{op}: {name} must be {expected}, got {tensor.dtype}")


def check_point_batch_arguments(op: str, x, y) -> None:
    """x [B, n, d] and y [B, m, d] of one dtype on one device, for the cost-matrix kernels."""
    if x.dim() != 3 or y.dim() != 3 or x.numel() == 0 or y.numel() == 0:
        raise ValueError(
            f"{op}: x and y must be non-empty [B, n, d] and [B, m, d] tensors, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"{op}: x [B, n, d] and y [B, m, d] must share B and d, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if x.dtype != y.dtype:
        raise TypeError(f"{op}: x and y must share a dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{op}: y is on {y.device} but x is on {x.device}")


def sinkhorn_op(*, fake=empty_sinkhorn_solution, device_types=None, triton=False):
    """Decorator: registers a backend's ``sinkhorn_<backend>(cost, a, b, epsilon, max_iter,
    tol, epsilon_start, scaling, relaxation, reach)`` as the op eotfast::sinkhorn_<backend>
    with SINKHORN_SCHEMA, under its own name (tracebacks and torch.ops name the same function).
    The implementation runs :func:`check_sinkhorn_arguments` first; ``fake`` (outputs for
    torch.compile) runs behind it. A ``triton_op`` for Triton launches (torch.compile then sees
    the kernel), else a ``custom_op`` (opaque to torch.compile: tracing would unroll up to
    max_iter iterations into the graph). The implementation is annotated with the schema's
    types: some torch releases (2.11) infer a triton_op's schema from the annotations even
    when ``schema=`` is given."""

    return _op_registration(SINKHORN_SCHEMA, check_sinkhorn_arguments, fake, device_types, triton)


# The one schema of every backend's auction op: cost [B, n, m] (n <= m), initial column prices
# [B, m], epsilon_start [B], epsilon_final [B] -> assignment [B, n] int64, final prices [B, m],
# epsilon [B] (epsilon_final, or inf where max_bids stopped a problem), n_bids [B] int64.
AUCTION_SCHEMA = (
    "(Tensor cost, Tensor prices, Tensor epsilon_start, Tensor epsilon_final, float scaling,"
    " int max_bids) -> (Tensor, Tensor, Tensor, Tensor)"
)


def check_auction_arguments(
    op: str, cost, prices, epsilon_start, epsilon_final, scaling, max_bids
) -> None:
    """Shapes, dtypes and devices of an auction op's arguments, for the same reason as
    :func:`check_sinkhorn_arguments` (public ops, raw pointers to kernels). Metadata only: no
    value is read, so it costs no device sync and the fakes run it too."""
    batch, n, m = check_cost_batch(op, cost)
    if cost.dtype not in SOLVER_DTYPES:
        raise TypeError(f"{op}: cost must be torch.float32 or torch.float64, got {cost.dtype}")
    if n > m:
        raise ValueError(
            f"{op}: cost [B, n, m] must have n <= m (each row gets its own column), got "
            f"{tuple(cost.shape)}; transpose it to assign the columns"
        )
    check_tensors_like_cost(
        op, cost,
        prices=(prices, (batch, m)),
        epsilon_start=(epsilon_start, (batch,)), epsilon_final=(epsilon_final, (batch,)),
    )  # fmt: skip
    if not 0 < scaling < 1:
        raise ValueError(f"{op}: scaling must be a number in (0, 1), got {scaling}")
    if max_bids < 1:
        raise ValueError(f"{op}: max_bids must be >= 1, got {max_bids}")


def empty_auction_solution(cost, prices, epsilon_start, epsilon_final, scaling, max_bids):
    """Outputs of an auction op on [B, n, m] problems, unfilled: assignment [B, n] and n_bids
    [B] int64, prices [B, m] and epsilon [B] in cost's dtype. The fake of every auction op, and
    the allocator of the C++ one."""
    batch, n, m = cost.shape
    return (
        cost.new_empty(batch, n, dtype=torch.int64),
        cost.new_empty(batch, m),
        cost.new_empty(batch),
        cost.new_empty(batch, dtype=torch.int64),
    )


def auction_op(*, device_types=None, triton=False):
    """Decorator: registers a backend's ``auction_<backend>(cost, prices, epsilon_start,
    epsilon_final, scaling, max_bids)`` as the op eotfast::auction_<backend> with
    AUCTION_SCHEMA, as :func:`sinkhorn_op` does (the implementation runs
    :func:`check_auction_arguments` first; the fake is :func:`empty_auction_solution` behind
    it). A ``triton_op`` for Triton launches, else a ``custom_op`` (opaque to torch.compile, as
    the bidding loop's length depends on the values)."""

    return _op_registration(
        AUCTION_SCHEMA, check_auction_arguments, empty_auction_solution, device_types, triton
    )


def _op_registration(schema: str, check, fake, device_types, triton: bool):
    """The decorator of :func:`sinkhorn_op` and :func:`auction_op`: registers
    ``implementation`` as op eotfast::<its name> with ``schema``, a ``triton_op`` when it
    launches Triton kernels, else a ``custom_op`` for ``device_types``; its fake is ``fake``
    behind ``check``. The implementation's annotations must state ``schema`` (some torch
    releases register a triton_op under the annotations' schema whatever ``schema=`` says):
    refused otherwise."""

    def register(implementation):
        name = implementation.__name__
        try:
            inferred = torch.library.infer_schema(implementation, mutates_args=())
        except ValueError as error:  # annotations missing, or of types no schema holds
            inferred = f"none ({error})"
        if inferred.replace("SymInt", "int") != schema:
            raise TypeError(
                f"eotfast::{name}: the implementation's annotations give the schema "
                f"{inferred}, the op's is {schema}"
            )

        def checked_fake(*arguments):  # the schema's arguments, in its order
            check(name, *arguments)
            return fake(*arguments)

        qualified = f"eotfast::{name}"
        if triton:
            op = torch.library.triton_op(qualified, implementation, mutates_args=(), schema=schema)
        else:
            op = torch.library.custom_op(
                qualified, implementation, mutates_args=(), device_types=device_types,
                schema=schema,
            )  # fmt: skip
        op.register_fake(checked_fake)
        return op

    return register


# Epsilon's range in a solve: at least RESOLUTION_ROUNDOFFS unit roundoffs of the largest
# |cost| the op sees (the shifted cost for balanced problems), and at most finfo.max / 1024.
# Below the first, the rounding of f + g - C, divided by epsilon, makes the plan noise: epsilon
# 1e-12 on float32 costs of ~0.5 gave rows off by 0.5 with marginal_error 0, and epsilon 0.01
# on float32 costs of 1e6 gave f = -inf or a NaN error. Above the second, a potential (epsilon
# times log-masses of up to ~745 in float64) overflows: absolute reg = 1e308 gave a NaN g with
# a finite error.
RESOLUTION_ROUNDOFFS = 16


def check_sinkhorn_values(op: str, cost, a, b, epsilon, epsilon_start, reach: float) -> None:
    """The values of a Sinkhorn op's arguments, the one value check of SINKHORN_SCHEMA that
    every backend's op runs: finite cost, valid marginals (of equal mass unless unbalanced,
    reach < inf), and every epsilon and epsilon_start within the range a solve in cost's dtype
    resolves (RESOLUTION_ROUNDOFFS, EPSILON_HEADROOM; an epsilon of 1e-45 or 0 gave f = -inf
    and pairs drawn from a garbage plan). Inside the ops, so that compiled callers, whose public
    functions skip their value checks while tracing, get the errors of eager ones; values are
    read only where that costs no device sync."""
    check_finite_values("cost", cost)
    check_marginal_values(a, b, equal_mass=math.isinf(reach))
    if not values_checkable(epsilon):
        return
    info = torch.finfo(epsilon.dtype)
    high = info.max / EPSILON_HEADROOM
    for name, tensor in (("epsilon", epsilon), ("epsilon_start", epsilon_start)):
        bad = ~((tensor >= info.tiny) & (tensor <= high))  # NaN is bad too
        if not bool(bad.any()):
            continue
        k = int(bad.nonzero()[0, 0])
        if name == "epsilon":
            raise ValueError(
                f"{op}: epsilon of problem {k} is {float(tensor[k]):.3g}, outside the positive "
                f"normal range of {epsilon.dtype} that a solve takes, [{info.tiny:.3g}, "
                f"{high:.3g}] (its potentials would overflow above); choose reg so that "
                "epsilon is of the order of the costs' spread"
            )
        # epsilon_start >= epsilon: the annealing starts at the costs' range.
        raise ValueError(
            f"{op}: epsilon_start of problem {k} is {float(tensor[k]):.3g}, outside "
            f"[{info.tiny:.3g}, {high:.3g}]: epsilon scaling starts at the costs' range, and "
            f"potentials of that size overflow {epsilon.dtype}; rescale the cost (or x and y, "
            "the points it was formed from), or solve in float64"
        )
    largest = cost.abs().amax(dim=(-2, -1))  # [B]
    resolution = RESOLUTION_ROUNDOFFS * (info.eps / 2) * largest
    unresolved = epsilon < resolution
    if bool(unresolved.any()):
        k = int(unresolved.nonzero()[0, 0])
        raise ValueError(
            f"{op}: epsilon of problem {k} is {float(epsilon[k]):.3g}, below the resolution "
            f"{float(resolution[k]):.3g} of its costs in {epsilon.dtype}: "
            f"{RESOLUTION_ROUNDOFFS} unit roundoffs of their largest magnitude as solved, "
            f"{float(largest[k]):.3g} (balanced costs are shifted by their minimum); the plan "
            "would be rounding noise: choose a larger reg, or solve in float64"
        )


def check_auction_values(op: str, cost, prices, epsilon_start, epsilon_final) -> None:
    """The values of an auction op's arguments, the one value check of AUCTION_SCHEMA that
    every backend's op runs (the C++ kernel checks the epsilons again itself): finite cost and
    prices, finite epsilons with 0 < epsilon_final <= epsilon_start per problem. Read on CPU
    tensors only (no device sync)."""
    check_finite_values("cost", cost)
    check_finite_values("prices", prices)
    if not values_checkable(epsilon_final):
        return
    valid = torch.isfinite(epsilon_start) & (epsilon_final > 0) & (epsilon_start >= epsilon_final)
    if not bool(valid.all()):
        k = int((~valid).nonzero()[0, 0])
        raise ValueError(
            f"{op}: problem {k} needs finite epsilons with 0 < epsilon_final <= epsilon_start, "
            f"got epsilon_start={float(epsilon_start[k])}, epsilon_final={float(epsilon_final[k])}"
        )


def broadcast_marginal(
    name: str,
    marginal: torch.Tensor | None,
    batch_shape: torch.Size,
    size: int,
    cost: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The marginal as a [B, size] tensor of `dtype` (cost's by default); uniform when None."""
    batch = batch_shape.numel()
    dtype = cost.dtype if dtype is None else dtype
    if marginal is None:
        return torch.full((batch, size), 1.0 / size, dtype=dtype, device=cost.device)
    check_tensor(name, marginal, min_dim=1)
    check_same_device(cost=cost, **{name: marginal})
    if marginal.shape[-1] != size or marginal.shape[:-1] not in (torch.Size(), batch_shape):
        raise ValueError(
            f"{name} must have shape ({size},) or {(*batch_shape, size)} to match cost of shape "
            f"{(*batch_shape, *cost.shape[-2:])}, got {tuple(marginal.shape)}"
        )
    return marginal.to(dtype).expand(*batch_shape, size).reshape(batch, size)
