"""Argument checks shared by the public functions.

Checks of shapes, dtypes and devices look only at metadata and run everywhere, compiled code
included. Checks of values (NaN, inf, negative mass) must read the data: they run for CPU
tensors, where reading costs no device synchronization, and are skipped for GPU tensors so
that the pairing path never waits on the device (a NaN there shows up as a NaN
``marginal_error``).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "check_tensor",
    "point_batches",
    "check_same_device",
    "check_positive",
    "check_iteration_limit",
    "check_sinkhorn_options",
    "check_reach",
    "check_epsilon_range",
    "assert_in_graph",
    "asserts_in_graph",
    "check_finite_values",
    "check_finite_range",
    "check_marginal_values",
    "values_checkable",
]


def check_tensor(name: str, value, *, min_dim: int, floating: bool = True) -> torch.Tensor:
    """Type, dtype and rank of one tensor argument; empty dimensions are rejected."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions, got shape {tuple(value.shape)}"
        )
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value


def _batch_dims_hint(x: torch.Tensor, y: torch.Tensor, batch_dims: int) -> str:
    """A suggestion for shapes that the given batch_dims cannot read: the batch_dims under
    which they would be two batches of equally shaped samples, if there is one (readings as
    scalar samples, which any shape has, are left out)."""
    for k in range(min(x.dim(), y.dim()) - 1):
        if k == batch_dims or x.shape[k + 1 :] != y.shape[k + 1 :]:
            continue
        try:
            torch.broadcast_shapes(x.shape[:k], y.shape[:k])
        except RuntimeError:
            continue
        if k == 0:
            return "; if the first dimension indexes samples, pass batch_dims=0"
        leading = "the first dimension indexes" if k == 1 else f"the first {k} dimensions index"
        return f"; if {leading} independent problems, pass batch_dims={k}"
    return ""


def point_batches(x, y, batch_dims, *, same_batch: bool = False):
    """Validated x [*batch, n, d] and y [*batch, m, d] views of two sample batches.

    The input contract of pair and cost_matrix: x has shape (*batch, n, *features), where
    batch is its first ``batch_dims`` dimensions (independent problems, none by default), n
    the samples and features the rest, flattened into d (an image batch [n, C, H, W] is n
    samples of d = C * H * W). y has the same feature shape, and batch dimensions that
    broadcast against x's (equal ones with ``same_batch``). No shape is guessed: a pair of
    shapes that only another ``batch_dims`` reads gets an error that says so.
    """
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, int) or batch_dims < 0:
        raise ValueError(
            f"batch_dims must be an integer >= 0 (the number of leading dimensions that index "
            f"independent problems), got {batch_dims!r}"
        )
    check_tensor("x", x, min_dim=batch_dims + 1)
    check_tensor("y", y, min_dim=batch_dims + 1)
    check_same_device(x=x, y=y)
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    reading = (
        f"read with batch_dims={batch_dims} as (*batch, samples, *features): x.shape="
        f"{tuple(x.shape)}, y.shape={tuple(y.shape)}"
    )
    if x.shape[batch_dims + 1 :] != y.shape[batch_dims + 1 :]:
        raise ValueError(
            f"x and y must have samples of the same shape, {reading}"
            f"{_batch_dims_hint(x, y, batch_dims)}"
        )
    x_batch, y_batch = x.shape[:batch_dims], y.shape[:batch_dims]
    if same_batch and x_batch != y_batch:
        raise ValueError(
            f"x and y must have the same batch dimensions, {reading}"
            f"{_batch_dims_hint(x, y, batch_dims)}"
        )
    try:
        torch.broadcast_shapes(x_batch, y_batch)
    except RuntimeError:
        raise ValueError(
            f"the batch dimensions of x and y must broadcast, {reading}"
            f"{_batch_dims_hint(x, y, batch_dims)}"
        ) from None
    x = x.reshape(*x.shape[: batch_dims + 1], -1)  # [*batch, n, d]
    y = y.reshape(*y.shape[: batch_dims + 1], -1)  # [*batch, m, d]
    return x, y


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors on one device, named in the error."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, tensor in named[1:]:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}; "
                "move them to one device"
            )


def check_positive(name: str, value) -> float:
    """A finite, strictly positive Python number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_iteration_limit(name: str, value) -> int:
    """An integer >= 1 that fits the ops' int64 argument."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise ValueError(f"{name} must be an integer from 1 to 2**63 - 1, got {value!r}")
    return value


def check_sinkhorn_options(reg, max_iter, tol, scaling, relaxation) -> float:
    """The number arguments of a Sinkhorn solve, checked without the cost (so that pair
    checks them whichever method it runs); returns reg as a float. ``relaxation`` None is
    resolved by eotfast.ops.solve.sinkhorn."""
    reg = check_positive("reg", reg)
    check_iteration_limit("max_iter", max_iter)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if scaling is not None and (
        isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not 0 < scaling < 1
    ):
        raise ValueError(f"scaling must be None or a number in (0, 1), got {scaling!r}")
    if relaxation is not None and (
        isinstance(relaxation, bool)
        or not isinstance(relaxation, (int, float))
        or not 1 <= relaxation < 2
    ):
        raise ValueError(f"relaxation must be None or a number in [1, 2), got {relaxation!r}")
    return reg


def check_reach(reach) -> float:
    """None (balanced) or rho > 0 of unbalanced OT, in cost units; returned as a float, inf
    for balanced."""
    if reach is None:
        return math.inf
    if isinstance(reach, bool) or not isinstance(reach, (int, float)) or not reach > 0:
        raise ValueError(
            f"reach must be None (balanced OT) or a number > 0 (rho of unbalanced OT, in cost "
            f"units), got {reach!r}"
        )
    return float(reach)


# The largest epsilon is finfo.max / EPSILON_HEADROOM: a potential is epsilon times log-masses
# of up to ~745 (float64; ~104 in float32), which must not overflow (eotfast.ops.common).
EPSILON_HEADROOM = 1024


def check_epsilon_range(epsilon: torch.Tensor, reg: float, relative_reg: bool) -> None:
    """Every epsilon a positive normal number of the solve dtype: reg = 1e-40, reg = 1e300,
    or a cost spread of 1e200 (float64) or under 1e-37 (float32) gave f = -inf, g = NaN and
    pairs all on column 0. Read on CPU tensors only (a GPU read would sync)."""
    if not values_checkable(epsilon):
        return
    info = torch.finfo(epsilon.dtype)
    largest = info.max / EPSILON_HEADROOM
    low, high = torch.aminmax(epsilon)
    if not (bool(low >= info.tiny) and bool(high <= largest)):
        bad = float(low) if not bool(low >= info.tiny) else float(high)
        scale = (
            f"reg x std(cost), std(cost) up to {float(high) / reg:.3g}" if relative_reg else "reg"
        )
        raise ValueError(
            f"reg={reg:g} gives epsilon = {bad:.3g} ({scale}), outside the positive normal "
            f"range of {epsilon.dtype} that a solve takes, [{info.tiny:.3g}, {largest:.3g}] "
            "(its potentials would overflow above); choose reg so that epsilon is of the order "
            "of the costs' spread"
        )


def values_checkable(tensor: torch.Tensor) -> bool:
    """True where reading values costs no device sync and no graph break."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def asserts_in_graph(tensor: torch.Tensor) -> bool:
    """True while torch.compile traces CPU tensors: there a check that reads values (which
    tracing cannot) becomes a run-time assertion in the graph (assert_in_graph). Not on other
    devices, where eager skips those reads too: on CUDA it would be a device-side assert,
    which aborts the process's CUDA context."""
    return tensor.device.type == "cpu" and torch.compiler.is_compiling()


def assert_in_graph(ok: torch.Tensor, message: str) -> None:
    """RuntimeError(message) when the compiled graph runs and `ok` (a bool tensor) is False:
    torch._assert_async, which compiled graphs keep where they drop a custom check op whose
    output is unused. Only where asserts_in_graph."""
    torch._assert_async(ok, message)


def check_finite_values(name: str, tensor: torch.Tensor) -> None:
    """Every entry of `tensor` finite, else ValueError naming `name` and NaN or inf. On CPU
    tensors only (no device sync); traced by torch.compile, a run-time assertion with the
    same words (assert_in_graph)."""
    if asserts_in_graph(tensor):
        if tensor.numel():
            low, high = torch.aminmax(tensor)
            ok = torch.isfinite(low) & torch.isfinite(high)
            assert_in_graph(ok, f"{name} contains NaN or inf; every entry must be finite")
        return
    if not values_checkable(tensor):
        return
    # min and max propagate NaN and expose +-inf: one reduction pass, where isfinite().all()
    # writes a bool tensor first (measured: 0.1 vs 2.0 ms on a 1024 x 1024 float32 cost).
    low, high = torch.aminmax(tensor)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        bad = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
        raise ValueError(f"{name} contains {bad}; every entry must be finite")


def check_finite_range(name: str, cost: torch.Tensor) -> None:
    """Finite entries, and each problem's max - min of a [..., n, m] cost finite in its dtype:
    the solvers shift the cost by its minimum, and float32 costs of +-3e38 overflowed there
    into an inf that was then reported as "cost contains inf". One pass over the cost for
    both (the per-problem minimum and maximum also expose NaN and inf)."""
    if not values_checkable(cost) or not cost.is_floating_point():
        return
    low, high = torch.aminmax(cost.flatten(-2), dim=-1)  # [...]
    if not bool((torch.isfinite(low) & torch.isfinite(high)).all()):
        check_finite_values(name, cost)  # raises, naming NaN or inf
    overflows = torch.isinf(high - low)
    if bool(overflows.any()):
        k = int(overflows.flatten().nonzero()[0, 0])
        raise ValueError(
            f"{name}'s entries span more than {cost.dtype} holds: from "
            f"{float(low.flatten()[k]):.3g} to {float(high.flatten()[k]):.3g} in problem {k}, "
            f"whose difference overflows; rescale {name} or pass float64"
        )


def check_marginal_values(
    a: torch.Tensor, b: torch.Tensor, *, equal_mass: bool = True, rtol: float = 1e-5
) -> None:
    """Nonnegative, finite marginals with positive total mass per problem, equal in a and b
    with ``equal_mass`` (balanced OT)."""
    for name, marginal in (("a", a), ("b", b)):
        check_finite_values(name, marginal)
        if values_checkable(marginal):
            if bool((marginal < 0).any()):
                raise ValueError(f"{name} must be nonnegative")
            if bool((marginal.sum(-1) <= 0).any()):
                raise ValueError(f"{name} must have positive total mass")
    if equal_mass and values_checkable(a) and values_checkable(b):
        mass_a = a.sum(-1, dtype=torch.float64)
        mass_b = b.sum(-1, dtype=torch.float64)
        if not bool(torch.isclose(mass_a, mass_b, rtol=rtol, atol=0).all()):
            worst = (mass_a - mass_b).abs().argmax()
            raise ValueError(
                "a and b must have the same total mass per problem, got "
                f"{float(mass_a.flatten()[worst]):.8g} and {float(mass_b.flatten()[worst]):.8g}"
            )
