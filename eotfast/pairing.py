"""pair(x, y): mini-batch OT pairing of a source batch with a target batch."""

from __future__ import annotations

import torch
import torch.distributed as dist

from eotfast._validation import (
    check_epsilon_range,
    check_finite_values,
    check_sinkhorn_options,
    point_batches,
)
from eotfast.exact import exact_plan
from eotfast.lap import optimal_assignment, warm_started_assignment
from eotfast.ops import solve
from eotfast.ops.common import SOLVER_DTYPES, epsilon_from_reg
from eotfast.ops.registry import resolve_backend
from eotfast.ops.torch_backend import draw_from_log_weights

__all__ = ["pair", "auto_method", "PAIR_METHODS", "SAMPLING_MODES"]

PAIR_METHODS = ("auto", "sinkhorn", "exact", "emd", "random")
SAMPLING_MODES = ("sample", "argmax", "permutation")


def auto_method(backend: str, n: int, m: int) -> tuple[str, str | None]:
    """(method, sampling) of ``pair(method="auto")`` with the resolved `backend`: the fastest
    pairing with distinct targets and (near-)optimal total cost, for n sources and m targets.

    "exact" (the auction) on "cpu", where the C++ auction costs less than the Sinkhorn
    iterations; Sinkhorn + "permutation" on the others, whose auctions bid in Jacobi rounds and
    need far fewer of them warm-started from the plan (measured per backend in bench/README.md,
    "Which method auto picks"). "host" (devices without an eotfast kernel) runs the C++
    auction, on a host copy, and keeps Sinkhorn + "permutation": the Sinkhorn solve stays on
    the device and the host's phase starts warm (a cold "exact" there is unmeasured).
    n > m admits no distinct targets: partners are then drawn from the Sinkhorn plan."""
    if n > m:
        return "sinkhorn", "sample"
    if backend == "cpu":
        return "exact", None
    return "sinkhorn", "permutation"


def _random_pairing(
    batch_shape: torch.Size, n: int, m: int, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniformly random partners: distinct targets when n <= m (a random injection)."""
    if n <= m:
        keys = torch.rand((*batch_shape, m), generator=generator, device=device)
        return keys.argsort(dim=-1)[..., :n]
    return torch.randint(m, (*batch_shape, n), generator=generator, device=device)


def pair(
    x: torch.Tensor,
    y: torch.Tensor,
    method: str = "auto",
    *,
    batch_dims: int = 0,
    reg: float = 0.05,
    relative_reg: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-3,
    scaling: float | None = 0.5,
    relaxation: float | None = None,
    sampling: str | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    group: dist.ProcessGroup | None = None,
    return_partners: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Pairs each source sample with a target sample by mini-batch optimal transport.

    The cost is the squared Euclidean distance (:func:`eotfast.cost_matrix`) of the flattened
    samples. Returns ``j`` such that ``(x[i], y[j[i]])`` are the pairs (with batch
    dimensions: ``(x[..., i, :], y[..., j[..., i], :])``).

    Parameters
    ----------
    x : Tensor, shape (n, *features), or (*batch, n, *features) with ``batch_dims``
        Source batch: the first dimension indexes the samples and the rest are flattened
        into the features, as torchcfm and POT read a batch, so image batches
        [n, C, H, W] go in as they are.
    y : Tensor, shape (m, *features), or (*batch, m, *features)
        Target batch: samples of x's feature shape, the same batch dimensions, dtype and
        device.
    method : {"auto", "sinkhorn", "exact", "emd", "random"}
        "auto" (the default): distinct targets of (near-)optimal total cost by the fastest
        route for the backend (:func:`auto_method`): "exact" with "cpu" (the CPU default),
        "sinkhorn" with sampling "permutation" with the others (the GPU default "triton");
        with n > m, "sinkhorn" with sampling "sample". Given a ``sampling``, "auto" means
        "sinkhorn" with that sampling.
        "sinkhorn": entropic plan by :func:`eotfast.sinkhorn`, one target per row drawn from
        the plan's row, its argmax, or the permutation closest to the plan (see
        ``sampling``); stays on the device, no host sync.
        "exact": optimal assignment (:func:`eotfast.assignment`, the auction, needs n <= m):
        distinct targets, the minimal total cost within the auction's bound, on the device:
        1e-6 of the gap between random partners' expected total and the sum of the row
        minima, but never below m * 16 ulps of the largest row range in the cost's dtype
        (float32: 8e-6 of the optimum on image batches; relatively more when the optimum is
        tiny next to the range, as for near-identical low-dimensional batches: pass float64
        points there).
        "emd": POT's exact plan (:func:`eotfast.emd`, solved on the host), then drawn from
        its rows like "sinkhorn". "random": uniformly random partners (distinct when
        n <= m), the baseline.
    reg, relative_reg, max_iter, tol, scaling, relaxation
        Passed to :func:`eotfast.sinkhorn` (wherever Sinkhorn runs). ``tol`` is 1e-3 here,
        against 1e-4 for :func:`eotfast.sinkhorn`: the pairs are as good as at 1e-4 and a
        looser tol costs the permutation's auction more bids than it saves iterations
        (bench/README.md, "pair's tolerance"). ``tol`` bounds the norm over all n + m
        marginal entries, so each target's mass is off by up to about tol * sqrt(m) of its
        own, root mean square: pass a smaller tol to draw from large plans ("permutation"
        and "exact" give every target once whatever tol).
    batch_dims : int
        How many leading dimensions of x and y index independent problems, each paired on
        its own (0: one problem). Shapes are never guessed: x [8, 256, 3072] is 8 samples of
        256 * 3072 features unless ``batch_dims=1`` says it holds 8 problems of 256 samples;
        shapes that only another ``batch_dims`` can read are an error that names it.
    backend : {"auto", "torch", "cpu", "host", "triton", "cuda"}
        Backend of the cost matrix, the Sinkhorn solve and the draw from the plan rows (see
        :func:`eotfast.sinkhorn` and eotfast.ops.registry).
    sampling : {"sample", "argmax", "permutation"}, optional
        How a target is taken from a plan row (methods "sinkhorn" and "emd"; default
        "sample"): drawn with the row's probabilities (pairs follow the plan, as in OT
        conditional flow matching), or the row's most likely target (several rows may then
        share a target). "permutation" (method "sinkhorn", n <= m): distinct targets, by the
        auction (:func:`eotfast.auction`) warm-started from the plan: one phase at the
        Sinkhorn epsilon from the prices -g, the plan's column potential (row i of the plan is
        proportional to exp((g_j - C_ij) / epsilon)). Its total cost is within m * epsilon
        of the optimal assignment's (the plan's resolution: closer for smaller ``reg``), for
        a fraction of the bids of a cold solve.
    generator : torch.Generator, optional
        Source of randomness for "sample" and "random", on x's device; fixes the pairs for a
        fixed seed. Leave None inside torch.compile.
    group : torch.distributed.ProcessGroup, optional
        Pairs over the global batch of a process group (``torch.distributed.group.WORLD``
        for every process): each process's sources against the targets of every process.
        Every process of the group calls ``pair`` with the same arguments and equal shapes;
        x and y are gathered (``all_gather``: NCCL keeps CUDA tensors on the device, gloo
        serves CPU tensors), every process solves the same problem of world * n sources and
        world * m targets, and keeps the rows of its own sources. ``j`` then indexes the
        concatenation of all processes' targets in rank order: the answer of one process
        pairing the concatenated batches, for these rows. Cost: (world * n) x (world * m)
        cost entries and their solve on every process, plus the gathers of x and y. The
        solves are deterministic, so distinct targets ("exact", "permutation") stay distinct
        across processes; "sample" draws each row on its own process, and "random" gives
        distinct targets across processes only with a ``generator`` seeded alike on each.
        None (the default): the local batch.
    return_partners : bool
        Return ``(j, partners)``, the partners being the targets themselves,
        ``partners[i] = y[j[i]]`` of shape (*batch, n, *features): with a ``group``, taken
        from the targets already gathered, so callers need not gather them again.

    Returns
    -------
    Tensor, shape (n,) or (*batch, n), int64
        Target index for each source sample, on x's device; ``(j, partners)`` with
        ``return_partners``.

    Examples
    --------
    >>> x0, x1 = torch.randn(64, 3, 32, 32), torch.randn(64, 3, 32, 32)
    >>> j = pair(x0, x1)  # [64]: distinct targets, near-optimal total cost
    >>> pairs = (x0, x1[j])
    >>> j = pair(x0, x1, "sinkhorn", generator=torch.Generator().manual_seed(0))  # from the plan
    >>> j = pair(x0.view(8, 8, 3, 32, 32), x1.view(8, 8, 3, 32, 32), batch_dims=1)  # [8, 8]
    """
    target_batch = y
    x, y = point_batches(x, y, batch_dims, same_batch=True)  # [*batch, n, d], [*batch, m, d]
    sample_shape = target_batch.shape[batch_dims + 1 :]  # what partners are returned as
    if method not in PAIR_METHODS:
        raise ValueError(f"method must be one of {PAIR_METHODS}, got {method!r}")
    if sampling is not None and sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
        if torch.compiler.is_compiling():
            # dynamo cannot trace a torch.Generator: its error would name neither pair nor it.
            raise ValueError(
                "generator must be None inside torch.compile, which cannot trace a torch."
                "Generator; the draw then takes torch's global generator (torch.manual_seed)"
            )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be a torch.distributed.ProcessGroup (or None for the local batch), "
            f"got {type(group).__name__}"
        )
    # Checked whichever method runs: "auto" picks Sinkhorn on some devices and not others.
    reg = check_sinkhorn_options(reg, max_iter, tol, scaling, relaxation)
    if not relative_reg:  # an absolute epsilon: its range is known before any cost
        dtype = x.dtype if x.dtype in SOLVER_DTYPES else torch.float32
        check_epsilon_range(torch.tensor(reg, dtype=dtype), reg, False)
    x, y = x.detach(), y.detach()  # pairing picks indices: nothing to differentiate
    world = 1 if group is None else dist.get_world_size(group)
    n, m = world * x.shape[-2], world * y.shape[-2]  # the (global) problem's size

    backend = resolve_backend(backend, x.device)  # also for "random": a bad name is an error
    if method == "auto":
        method, sampling = (
            auto_method(backend, n, m) if sampling is None else ("sinkhorn", sampling)
        )
    if method in ("exact", "random") and sampling is not None:
        raise ValueError(
            f"sampling applies to methods 'sinkhorn' and 'emd' (and 'auto', which it makes "
            f"'sinkhorn'); method={method!r} gives distinct targets itself, got "
            f"sampling={sampling!r}"
        )
    sampling = sampling or "sample"
    permutation = sampling == "permutation" and method == "sinkhorn"
    if permutation and n > m:
        raise ValueError(
            f"sampling='permutation' needs n <= m (each source its own target), got {n} "
            f"sources and {m} targets; use sampling='sample' or 'argmax'"
        )
    if method == "exact" and n > m:
        raise ValueError(
            f"method='exact' needs n <= m (each source its own target): x has {n} samples and "
            f"y has {m}; swap x and y, or use method='sinkhorn'"
        )
    if sampling == "permutation" and method == "emd":
        raise ValueError(
            "sampling='permutation' applies to method 'sinkhorn'; for an optimal permutation "
            "use method='exact'"
        )

    # ---- the global batch: every process gathers x and y and keeps its own rows
    rows = slice(None)  # the rows of this process's sources
    if group is not None:  # every argument checked: no process leaves a collective behind
        rank, n_local = dist.get_rank(group), x.shape[-2]
        rows = slice(rank * n_local, (rank + 1) * n_local)
        x, y = _all_gather_samples(x, group), _all_gather_samples(y, group)

    # ---- partners [*batch, n] by the resolved method
    if method == "random":  # the one method without a cost matrix, which checks x and y
        check_finite_values("x", x)
        check_finite_values("y", y)
        j = _random_pairing(x.shape[:-2], x.shape[-2], y.shape[-2], x.device, generator)
    else:
        cost = solve.cost_matrix(x, y, backend=backend)  # [*batch, n, m]
        if method == "exact":
            j = optimal_assignment(cost, backend=backend)
        elif method == "emd":
            j = draw_from_log_weights(exact_plan(cost).log(), sampling, generator)
        else:
            epsilon = epsilon_from_reg(cost, reg, relative_reg)  # [*batch]
            if relative_reg:  # an absolute epsilon was checked with the other arguments
                check_epsilon_range(epsilon, reg, relative_reg)
            # The shifted cost and its g keep float32 digits that the unshifted pair would lose.
            result, shifted_cost, _ = solve.sinkhorn(
                cost, None, None, epsilon=epsilon, backend=backend, max_iter=max_iter, tol=tol,
                scaling=scaling, relaxation=relaxation, overwrite_cost=True,
            )  # fmt: skip
            if sampling == "permutation":
                j = warm_started_assignment(shifted_cost, result, backend=backend).assignment
            else:
                j = solve.draw_partners(
                    shifted_cost, result, sampling=sampling, generator=generator,
                    backend=backend,
                )  # fmt: skip
    j = j[..., rows]
    if not return_partners:
        return j
    partners = y.gather(-2, j[..., None].expand(*j.shape, y.shape[-1]))  # [*batch, n, d]
    return j, partners.reshape(*j.shape, *sample_shape)


def _all_gather_samples(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every process's t [*batch, n, d] (equal shapes), concatenated along the samples in
    rank order: [*batch, world * n, d], the same on every process."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=-2)
