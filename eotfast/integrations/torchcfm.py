r"""A drop-in for torchcfm's ``OTPlanSampler``, solved by eotfast.

torchcfm (conditional flow matching) pairs each mini-batch by optimal transport through
``torchcfm.optimal_transport.OTPlanSampler``: the squared Euclidean cost by ``torch.cdist``,
the plan by POT on the host, pairs drawn from the plan with numpy's global generator.
:class:`OTPlanSampler` here has the same constructor, methods and results; the exact plan comes
from eotfast's auction and the entropic plan from eotfast's log-domain Sinkhorn:

>>> from eotfast.integrations.torchcfm import OTPlanSampler
>>> sampler = OTPlanSampler(method="exact")
>>> x0, x1 = sampler.sample_plan(x0, x1)                # as torchcfm's, faster

Three ways in, none of which needs torchcfm to be imported first (this module imports without
it):

- build the sampler yourself, as above;
- ``use_eotfast(flow_matcher)`` swaps the ``ot_sampler`` of a torchcfm flow matcher
  (``ExactOptimalTransportConditionalFlowMatcher``, ``SchrodingerBridgeConditionalFlowMatcher``)
  for a drop-in with the same settings;
- ``patch_torchcfm()`` replaces torchcfm's class itself, for code that builds samplers inside
  (``with patch_torchcfm(): ...`` restores it on exit).

By default every result is torchcfm's: the same plan (equal to POT's wherever the optimum is
unique), the same draws for the same ``np.random.seed``. Opt in, by keyword, to a mode that
never leaves the inputs' device (``on_device=True``).
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import numpy as np
import ot as pot
import scipy.optimize
import torch

import eotfast
from eotfast.ops.registry import BACKEND_NAMES

__all__ = ["OTPlanSampler", "patch_torchcfm", "use_eotfast", "METHODS", "DEVICE_SAMPLINGS"]

METHODS = ("exact", "sinkhorn", "unbalanced", "partial")
DEVICE_SAMPLINGS = ("sample", "argmax", "permutation")

# torchcfm calls ot.sinkhorn with reg only, so POT's defaults decide when it stops:
# stopThr = 1e-9 on ||P^T 1 - b||_2, numItermax = 1000.
POT_SINKHORN_TOL = 1e-9
POT_SINKHORN_MAX_ITER = 1000
# torchcfm's test of an unusable plan: total mass below this reverts to the uniform plan.
UNUSABLE_MASS = 1e-8
# The exact plan's auction on a float64 copy of the cost. Its total is at most m * epsilon above
# the optimum. Every float32 number is a multiple of its ulp, so two assignment totals of a
# float32 cost whose entries are >= c > 0 are equal or differ by at least ulp32(c): with
# m * epsilon = ulp32(c) / 2 the total is the optimum itself (an optimal assignment, POT's
# where the optimum is unique). Image costs (n = 1024, d = 3072, c ~ 430): epsilon = 1.5e-8,
# 35,185 bids in 13 ms against 41,640 in 15 ms down to the float64 floor (1 thread). Other
# costs (float64, or a zero entry) go down to EXACT_EPSILON, which eotfast.auction raises to
# its precision floor, 16 ulps of the cost range in float64: bound 2.5e-11 to 4e-11 on the
# gaussians of torchcfm's test_get_map (n = 128, d = 8), where 3000 random problems gave POT's
# plan every time.
EXACT_EPSILON = 1e-300


def _warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside this module (the user's line,
    whichever public method led here)."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[n, *dim] -> [n, d], as torchcfm flattens the samples."""
    return x.reshape(x.shape[0], -1)


def _torchcfm_draw(pi, batch_size, replace):
    """torchcfm's sample_map, step for step: np.random.choice over the flattened plan."""
    p = pi.flatten()
    p = p / p.sum()
    choices = np.random.choice(pi.shape[0] * pi.shape[1], p=p, size=batch_size, replace=replace)
    return np.divmod(choices, pi.shape[1])


def _draw_from_plan(pi, batch_size, replace=True, nonzero=None):
    """(i, j) drawn from the plan as torchcfm's sample_map draws them, bit for bit.

    np.random.choice(N, p=p, size=k) with replacement validates p, forms cdf = cumsum(p),
    divides it by cdf[-1], draws k doubles (random_sample) and takes
    cdf.searchsorted(u, side="right"). Entries with p = 0 leave the running sum unchanged,
    so the cdf at the nonzero entries is the cumulative sum of the nonzero entries alone, and
    the first cdf value above u is at a nonzero entry: the same indices from a cdf over the
    nonzero entries only, with the same draws from the global generator. A permutation plan
    has n nonzero entries among n^2: at n = 1024 the draw took 2.8 ms instead of 12.2 ms
    (given the nonzero positions, less). Anything else (without replacement, a plan that is
    not a float64 array, values np.random.choice would reject) takes torchcfm's own steps."""
    if not (
        replace
        and isinstance(pi, np.ndarray)
        and pi.dtype == np.float64
        and pi.ndim == 2
        and isinstance(batch_size, (int, np.integer))
    ):
        return _torchcfm_draw(pi, batch_size, replace)
    p = pi.reshape(-1)
    total = p.sum()  # the sum torchcfm divides by: numpy's, over the same dense array
    if nonzero is None:
        nonzero = np.flatnonzero(p)
    weights = p[nonzero] / total
    # np.random.choice raises where the sum is off by more than sqrt(float64 eps) = 1.5e-8,
    # or on NaN or negative entries: those (and more) go to it, so it raises as for torchcfm.
    if (
        weights.size == 0
        or not np.isfinite(weights).all()
        or (weights < 0).any()
        or abs(weights.sum() - 1) > 1e-9
    ):
        return _torchcfm_draw(pi, batch_size, replace)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    uniform = np.random.random_sample(batch_size)
    return np.divmod(nonzero[cdf.searchsorted(uniform, side="right")], pi.shape[1])


class OTPlanSampler:
    r"""Mini-batch OT pairs for conditional flow matching: torchcfm's ``OTPlanSampler``,
    solved by eotfast.

    Same constructor, methods and results as ``torchcfm.optimal_transport.OTPlanSampler``
    (1.0.7, plus ``sample_plan_with_scipy`` of its later revisions): the cost is the squared
    Euclidean distance of the flattened samples (:func:`eotfast.cost_matrix`, in the inputs'
    dtype as ``torch.cdist(x0, x1) ** 2``), divided by its maximum if ``normalize_cost``;
    ``get_map`` returns the plan as a float64 numpy array; ``sample_map`` and the
    ``sample_*`` methods draw from numpy's global generator exactly as torchcfm does, so
    ``np.random.seed(s)`` gives torchcfm's indices for the same plan.

    Parameters
    ----------
    method : {"exact", "sinkhorn", "unbalanced", "partial"}
        "exact": the optimal plan with uniform marginals. With as many sources as targets
        it is a permutation, found by eotfast's auction (:func:`eotfast.auction`) on the
        cost in float64, run down to a bound (m * epsilon) below what separates two
        assignment totals of a float32 cost (half the float32 ulp of its smallest entry), so
        that its total is the optimum itself: POT's ``ot.emd`` plan, equal entry for entry
        (entries 1/n), whenever the optimum is unique (on ties both are optimal and may
        differ). Otherwise (n != m) POT's ``ot.emd``, as torchcfm.
        "sinkhorn": the entropic plan at the absolute regularization ``reg`` by eotfast's
        log-domain Sinkhorn (:func:`eotfast.sinkhorn`, ``relative_reg=False``) in float64,
        to POT's defaults for ``ot.sinkhorn`` (stop at a column error of 1e-9 or after 1000
        iterations). Where POT's kernel exp(-C / reg) underflows (image costs in the
        thousands at reg = 0.05), ``ot.sinkhorn`` returns a plan of mass 0 and torchcfm
        falls back to the uniform plan, i.e. random pairs; the log-domain solve returns the
        entropic plan there.
        "unbalanced", "partial": POT's ``sinkhorn_knopp_unbalanced`` (``reg``, ``reg_m``) and
        ``entropic_partial_wasserstein`` (``reg``), called as torchcfm calls them.
    reg : float
        Entropic regularization (absolute, POT's ``reg``) of "sinkhorn", "unbalanced" and
        "partial"; > 0 for those (checked here; torchcfm lets POT fail on it).
    reg_m : float
        Marginal relaxation of "unbalanced".
    normalize_cost : bool
        Divide the cost by its maximum before solving (with ``on_device=True``, method
        "sinkhorn" and an absolute ``reg``: one more cost matrix per call, for its maximum).
    num_threads : int or "max"
        POT's ``numThreads`` for ``ot.emd``, which solves "exact" only when n != m (the
        auction of the square case runs on one thread: a single problem).
    warn : bool
        Warn when a plan is not usable (not finite, or of total mass below 1e-8: as torchcfm,
        the uniform plan replaces it) and when Sinkhorn stops above its tolerance.

    Other Parameters
    ----------------
    on_device : bool, keyword-only
        False (the default): torchcfm's behaviour, plans on the host, draws from numpy's
        global generator. True: ``sample_plan``, ``sample_plan_with_labels``,
        ``sample_trajectory`` and ``sample_plan_with_scipy`` never leave the inputs' device
        (no numpy, no host sync on CUDA) and give each source its own pair, through
        :func:`eotfast.pair`: method "exact" gives the optimal assignment (distinct
        targets, needs n <= m; eotfast's default auction bound, ~1e-6 of the optimum);
        method "sinkhorn" draws each source's target from its row of the plan (``sampling``).
        "unbalanced" and "partial" have no on-device solver (an error here). ``get_map`` and
        ``sample_map`` work on numpy plans in either mode.
    sampling : {"sample", "argmax", "permutation"}, keyword-only, optional
        With ``on_device=True`` and method "sinkhorn": how a target is taken from a plan row
        (:func:`eotfast.pair`); default "sample". "permutation": distinct targets, within
        m * epsilon of the optimal assignment (the fast near-optimal route on GPUs).
    generator : torch.Generator, keyword-only, optional
        With ``on_device=True``: the generator of the "sample" draws, on the inputs' device
        (None: torch's default generator). The default mode draws from numpy's global
        generator, as torchcfm.
    backend : {"auto", "torch", "cpu", "host", "triton", "cuda"}, keyword-only
        eotfast's backend for the cost matrix and, on the device, the solve. The default
        mode solves on the host, where "host", "triton" and "cuda" mean "auto".
    relative_reg : bool, keyword-only
        True: ``reg`` is relative to std(cost), eotfast's convention (so that reg = 0.05
        means the same on image costs in the thousands as on unit-scale ones). False (the
        default): absolute, as torchcfm.
    tol, max_iter : keyword-only
        Sinkhorn's stopping rule: the marginal error (:func:`eotfast.sinkhorn`) and the most
        iterations. ``tol=None``: POT's 1e-9 in the default mode, :func:`eotfast.pair`'s
        1e-3 on the device. ``max_iter``: 1000, POT's ``numItermax``.

    Notes
    -----
    Deliberate differences from torchcfm (all results otherwise equal):

    - A non-finite plan is treated as unusable (warned, replaced by the uniform plan);
      torchcfm prints it and fails later, in np.random.choice. Non-finite samples raise
      ValueError (:func:`eotfast.cost_matrix`); half-precision samples get a float32 cost.
    - "sinkhorn" does not collapse to the uniform plan where POT's kernel underflows (above).
    - ``sample_trajectory`` returns a numpy array also for CUDA samples or samples that
      require grad (torchcfm's ``np.stack`` fails on them).
    - ``sample_plan_with_scipy`` returns samples of the inputs' shape (torchcfm's later
      revision returns them flattened) and refuses n > m (it would pair only m sources).
    - There is no ``ot_fn`` attribute: the method is ``method``.

    Examples
    --------
    >>> sampler = OTPlanSampler("exact")
    >>> x0, x1 = sampler.sample_plan(x0, x1)                  # torchcfm's pairs, faster
    >>> i, j = sampler.sample_plan(x0, x1, return_indices=True)
    >>> gpu = OTPlanSampler("exact", on_device=True)          # distinct targets, no host sync
    >>> sb = OTPlanSampler("sinkhorn", reg=0.5, on_device=True,
    ...                    generator=torch.Generator("cuda").manual_seed(0))
    """

    def __init__(
        self,
        method: str,
        reg: float = 0.05,
        reg_m: float = 1.0,
        normalize_cost: bool = False,
        num_threads: int | str = 1,
        warn: bool = True,
        *,
        on_device: bool = False,
        sampling: str | None = None,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        relative_reg: bool = False,
        tol: float | None = None,
        max_iter: int = POT_SINKHORN_MAX_ITER,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"Unknown method: {method!r}; choose one of {METHODS}")
        if method != "exact" and (
            isinstance(reg, bool) or not isinstance(reg, (int, float)) or not 0 < reg < math.inf
        ):
            raise ValueError(f"reg must be a finite number > 0 for method {method!r}, got {reg!r}")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        if on_device and method in ("unbalanced", "partial"):
            raise ValueError(
                f"on_device=True has no solver for method {method!r} (POT solves it on the "
                "host): use method 'exact' or 'sinkhorn', or on_device=False"
            )
        if sampling is not None:
            if sampling not in DEVICE_SAMPLINGS:
                raise ValueError(f"sampling must be one of {DEVICE_SAMPLINGS}, got {sampling!r}")
            if not on_device or method != "sinkhorn":
                raise ValueError(
                    "sampling applies with on_device=True and method 'sinkhorn' (method "
                    "'exact' gives distinct targets itself; the default mode draws as "
                    f"torchcfm), got sampling={sampling!r} with method={method!r}, "
                    f"on_device={on_device}"
                )
        if generator is not None and not on_device:
            raise ValueError(
                "generator applies with on_device=True: the default mode draws from numpy's "
                "global generator, as torchcfm (seed it with np.random.seed)"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.method = method
        self.reg = reg
        self.reg_m = reg_m
        self.normalize_cost = normalize_cost
        self.num_threads = num_threads
        self.warn = warn
        self.on_device = bool(on_device)
        self.sampling = sampling
        self.generator = generator
        self.backend = backend
        self.relative_reg = bool(relative_reg)
        self.tol = tol
        self.max_iter = max_iter

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.settings().items())
        return f"{type(self).__name__}({options})"

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments, by name: ``OTPlanSampler(**s.settings())`` is a copy."""
        return {
            "method": self.method, "reg": self.reg, "reg_m": self.reg_m,
            "normalize_cost": self.normalize_cost, "num_threads": self.num_threads,
            "warn": self.warn, "on_device": self.on_device, "sampling": self.sampling,
            "generator": self.generator, "backend": self.backend,
            "relative_reg": self.relative_reg, "tol": self.tol, "max_iter": self.max_iter,
        }  # fmt: skip

    # ------------------------------------------------------------------------- plans
    @property
    def _host_backend(self) -> str:
        # The default mode solves on the host: the GPU backends have nothing to run there.
        return self.backend if self.backend in ("cpu", "torch") else "auto"

    def _cost(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """[n, m] squared Euclidean cost of the flattened samples, on their device."""
        cost = eotfast.cost_matrix(_flat(x0).detach(), _flat(x1).detach(), backend=self.backend)
        if self.normalize_cost:
            cost = cost / cost.max()  # torchcfm's "should not be used" option, kept as is
        return cost

    def _optimal_columns(self, cost: torch.Tensor) -> np.ndarray:
        """Column of each row in an optimal assignment of the [n, m] cost (n <= m), on the
        host in float64: the auction down to an epsilon that makes it exact (EXACT_EPSILON)."""
        cost64 = cost.detach().to("cpu", torch.float64)
        epsilon = EXACT_EPSILON
        if cost.dtype == torch.float32:
            smallest = float(cost64.amin())
            if smallest > 0:  # ulp32(smallest) / (2 m): frexp gives smallest = f * 2**e
                epsilon = math.ldexp(1.0, math.frexp(smallest)[1] - 24) / (2 * cost.shape[1])
        result = eotfast.auction(cost64, epsilon=epsilon, backend=self._host_backend)
        if not math.isfinite(float(result.epsilon)):  # stopped by its bid cap: never seen
            return scipy.optimize.linear_sum_assignment(cost64.numpy())[1]
        return result.assignment.numpy()

    def _sinkhorn_plan(self, cost: torch.Tensor) -> np.ndarray:
        tol = POT_SINKHORN_TOL if self.tol is None else self.tol
        cost64 = cost.detach().to("cpu", torch.float64)
        result = eotfast.sinkhorn(
            cost64, reg=self.reg, relative_reg=self.relative_reg, max_iter=self.max_iter,
            tol=tol, backend=self._host_backend,
        )  # fmt: skip
        error = float(result.marginal_error)
        if self.warn and not error < tol:
            _warn(
                f"eotfast OTPlanSampler: Sinkhorn stopped after {int(result.n_iter)} "
                f"iterations with marginal error {error:.3g}, above tol={tol:g}; raise "
                "max_iter or reg"
            )
        return result.plan(cost64).numpy()

    def _plan(self, cost: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(plan, flat positions of its nonzero entries where known, else None)."""
        n, m = cost.shape
        if self.method == "exact" and n == m:
            columns = self._optimal_columns(cost)
            plan = np.zeros((n, m))
            plan[np.arange(n), columns] = pot.unif(n)  # ot.emd's entries: a_i = 1/n exactly
            return plan, np.arange(n) * m + columns
        a, b = pot.unif(n), pot.unif(m)
        if self.method == "sinkhorn":
            plan = self._sinkhorn_plan(cost)
        else:
            host_cost = cost.detach().cpu().numpy()  # what torchcfm hands POT
            if self.method == "exact":
                plan = pot.emd(a, b, host_cost, numThreads=self.num_threads)
            elif self.method == "unbalanced":
                plan = pot.unbalanced.sinkhorn_knopp_unbalanced(
                    a, b, host_cost, reg=self.reg, reg_m=self.reg_m
                )
            else:
                plan = pot.partial.entropic_partial_wasserstein(a, b, host_cost, reg=self.reg)
        if not np.all(np.isfinite(plan)) or np.abs(plan.sum()) < UNUSABLE_MASS:
            if self.warn:
                _warn(
                    "eotfast OTPlanSampler: the OT plan is not usable (not finite, or of "
                    "total mass below 1e-8); reverting to the uniform plan"
                )
            plan = np.ones_like(plan) / plan.size
        return plan, None

    def get_map(self, x0: torch.Tensor, x1: torch.Tensor) -> np.ndarray:
        """The OT plan between a source and a target mini-batch (squared Euclidean cost).

        Parameters
        ----------
        x0 : Tensor, shape (n, *dim)
            Source mini-batch.
        x1 : Tensor, shape (m, *dim)
            Target mini-batch, same features.

        Returns
        -------
        numpy.ndarray, shape (n, m), float64
            The plan of ``method`` (see the class), solved on the host whatever the mode.
        """
        return self._plan(self._cost(x0, x1))[0]

    # ------------------------------------------------------------------------- draws
    def sample_map(self, pi: np.ndarray, batch_size: int, replace: bool = True):
        r"""Draws ``batch_size`` index pairs :math:`(i, j) \sim \pi`, as torchcfm.

        The indices are torchcfm's for the same plan and numpy global state
        (``np.random.seed``): ``np.random.choice`` over the flattened plan normalized to
        1, with replacement by default; with replacement, it is computed over the plan's
        nonzero entries only, which gives the same indices (4x faster at n = 1024 on a
        permutation plan).

        Parameters
        ----------
        pi : numpy.ndarray, shape (n, m)
            A plan (nonnegative, any positive total).
        batch_size : int
            Number of pairs to draw.
        replace : bool
            Draw with replacement (torchcfm's default).

        Returns
        -------
        (numpy.ndarray, numpy.ndarray), each shape (batch_size,), int64
            Source indices i and target indices j.
        """
        return _draw_from_plan(pi, batch_size, replace)

    def _host_pairs(self, x0, x1, replace):
        """(i, j) as index tensors on the samples' devices, drawn as torchcfm draws them."""
        plan, nonzero = self._plan(self._cost(x0, x1))
        i, j = _draw_from_plan(plan, x0.shape[0], replace, nonzero)
        return torch.from_numpy(i).to(x0.device), torch.from_numpy(j).to(x1.device)

    def _device_partners(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """[n] target of each source by eotfast.pair on the samples' device (on_device)."""
        x, y = _flat(x0).detach(), _flat(x1).detach()
        if self.method == "exact":
            if x.shape[0] > y.shape[0]:
                raise ValueError(
                    f"on_device=True with method 'exact' gives every source its own target "
                    f"and needs n <= m, got {x.shape[0]} sources and {y.shape[0]} targets; "
                    "use method 'sinkhorn' or on_device=False"
                )
            # The cost's scale does not move the optimal assignment: normalize_cost is moot.
            return eotfast.pair(x, y, method="exact", backend=self.backend)
        if self.normalize_cost and not self.relative_reg:
            # C / max(C) at an absolute reg is the cost of the samples scaled by
            # 1 / sqrt(max(C)): a scale kept on the device (one more cost matrix).
            scale = eotfast.cost_matrix(x, y, backend=self.backend).amax().rsqrt()
            x, y = x * scale, y * scale
        options = {} if self.tol is None else {"tol": self.tol}
        return eotfast.pair(
            x, y, method="sinkhorn", reg=self.reg, relative_reg=self.relative_reg,
            max_iter=self.max_iter, sampling=self.sampling or "sample",
            generator=self.generator, backend=self.backend, **options,
        )  # fmt: skip

    def sample_plan(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor,
        replace: bool = True,
        *,
        return_indices: bool = False,
    ):
        r"""Solves the plan :math:`\pi` between two mini-batches and draws pairs from it.

        Default mode: ``get_map`` then ``sample_map(pi, n, replace)``, as torchcfm: n pairs
        (i, j) drawn from the joint plan (a source may appear several times, another not at
        all), the same indices as torchcfm's for the same ``np.random.seed``.
        ``on_device=True``: every source once, in order, with its target from
        :func:`eotfast.pair` (see the class); ``replace`` is moot there (the pairs are
        distinct).

        Parameters
        ----------
        x0 : Tensor, shape (n, *dim)
            Source mini-batch.
        x1 : Tensor, shape (m, *dim)
            Target mini-batch.
        replace : bool
            Draw with replacement (default mode).
        return_indices : bool, keyword-only
            Return the indices (i, j) instead of the samples.

        Returns
        -------
        (Tensor, Tensor)
            ``(x0[i], x1[j])``, each of n samples (on the device: ``x0`` itself and
            ``x1[j]``); with ``return_indices``, ``(i, j)``, int64 tensors of shape (n,) on
            the samples' devices.
        """
        if self.on_device:
            j = self._device_partners(x0, x1)
            if return_indices:
                return torch.arange(x0.shape[0], device=x0.device), j
            return x0, x1[j]
        i, j = self._host_pairs(x0, x1, replace)
        return (i, j) if return_indices else (x0[i], x1[j])

    def sample_plan_with_labels(self, x0, x1, y0=None, y1=None, replace=True):
        r"""``sample_plan`` that also returns the labels of the pairs.

        Parameters
        ----------
        x0 : Tensor, shape (n, *dim)
            Source mini-batch.
        x1 : Tensor, shape (m, *dim)
            Target mini-batch.
        y0 : Tensor, shape (n, ...), optional
            Source labels.
        y1 : Tensor, shape (m, ...), optional
            Target labels.
        replace : bool
            Draw with replacement (default mode).

        Returns
        -------
        (Tensor, Tensor, Tensor or None, Tensor or None)
            ``x0[i], x1[j], y0[i], y1[j]`` (None for a label not given); on the device,
            ``x0, x1[j], y0, y1[j]``.
        """
        if self.on_device:
            j = self._device_partners(x0, x1)
            return x0, x1[j], y0, (y1[j] if y1 is not None else None)
        i, j = self._host_pairs(x0, x1, replace)
        return (
            x0[i],
            x1[j],
            y0[i] if y0 is not None else None,
            y1[j] if y1 is not None else None,
        )

    def sample_plan_with_scipy(self, x0: torch.Tensor, x1: torch.Tensor):
        """x0 in its order, x1 reordered by an optimal assignment (torchcfm's later revisions:
        scipy's ``linear_sum_assignment``; here eotfast's auction, the same assignment where
        the optimum is unique).

        Default mode: the auction on the host in float64, down to its precision floor (as
        ``get_map``'s exact plan). ``on_device=True``: :func:`eotfast.pair` "exact" on the
        samples' device (eotfast's default bound, ~1e-6 of the optimum). ``method`` is not
        used; ``normalize_cost`` is (it cannot change the assignment beyond rounding).

        Parameters
        ----------
        x0 : Tensor, shape (n, *dim)
            Source mini-batch.
        x1 : Tensor, shape (m, *dim), m >= n
            Target mini-batch.

        Returns
        -------
        (Tensor, Tensor)
            ``x0`` and ``x1[j]``, in the inputs' shapes: n distinct targets of minimal total
            cost.
        """
        if x0.shape[0] > x1.shape[0]:
            raise ValueError(
                f"sample_plan_with_scipy gives every source its own target and needs n <= m, "
                f"got {x0.shape[0]} sources and {x1.shape[0]} targets"
            )
        if self.on_device:
            j = eotfast.pair(
                _flat(x0).detach(), _flat(x1).detach(), method="exact", backend=self.backend
            )
        else:
            j = torch.from_numpy(self._optimal_columns(self._cost(x0, x1))).to(x1.device)
        return x0, x1[j]

    def sample_trajectory(self, X: torch.Tensor):
        """OT trajectories through populations observed at several times.

        Default mode, as torchcfm: plans between consecutive times, then for each sample of
        the current population a successor drawn from its plan row with
        ``np.random.choice``. ``on_device=True``: each time step's partners by
        :func:`eotfast.pair` (one per sample, so samples that meet at a time share their
        path from there on).

        Parameters
        ----------
        X : Tensor, shape (n, times, *dim)
            Populations at each time (n samples each).

        Returns
        -------
        numpy.ndarray or Tensor, shape (n, times, *dim)
            The trajectories: a numpy array by default (as torchcfm), a tensor on X's
            device with ``on_device=True``.
        """
        times = X.shape[1]
        if self.on_device:
            index = torch.arange(X.shape[0], device=X.device)
            steps = [X[:, 0]]
            for t in range(times - 1):
                index = self._device_partners(X[:, t], X[:, t + 1])[index]
                steps.append(X[:, t + 1][index])
            return torch.stack(steps, dim=1)
        plans = [self.get_map(X[:, t], X[:, t + 1]) for t in range(times - 1)]
        indices = [np.arange(X.shape[0])]
        for pi in plans:
            rows = [np.random.choice(pi.shape[1], p=pi[i] / pi[i].sum()) for i in indices[-1]]
            indices.append(np.array(rows))
        steps = [X[:, t][torch.from_numpy(indices[t]).to(X.device)] for t in range(times)]
        return torch.stack(steps, dim=1).detach().cpu().numpy()


# ----------------------------------------------------------------------------- torchcfm
# The plan functions of torchcfm's sampler (its ot_fn), by the method they stand for.
_POT_METHODS = {
    pot.emd: "exact",
    pot.sinkhorn: "sinkhorn",
    pot.unbalanced.sinkhorn_knopp_unbalanced: "unbalanced",
    pot.partial.entropic_partial_wasserstein: "partial",
}
_POT_METHOD_NAMES = {function.__name__: method for function, method in _POT_METHODS.items()}


def _settings_of(sampler, method: str | None) -> dict[str, Any]:
    """Constructor arguments of a drop-in equivalent to `sampler` (torchcfm's or ours)."""
    if isinstance(sampler, OTPlanSampler):
        return sampler.settings()
    ot_fn = getattr(sampler, "ot_fn", None)
    function = getattr(ot_fn, "func", ot_fn)  # torchcfm: functools.partial(pot.emd, ...)
    keywords = dict(getattr(ot_fn, "keywords", None) or {})
    if method is None:
        method = _POT_METHODS.get(function) or _POT_METHOD_NAMES.get(
            getattr(function, "__name__", None)
        )
    if method is None:
        raise ValueError(
            f"cannot tell the method of the ot_sampler {sampler!r} from its ot_fn "
            f"{ot_fn!r} (expected POT's emd, sinkhorn, sinkhorn_knopp_unbalanced or "
            "entropic_partial_wasserstein); pass method=..."
        )
    return {
        "method": method,
        "reg": getattr(sampler, "reg", keywords.get("reg", 0.05)),
        "reg_m": getattr(sampler, "reg_m", keywords.get("reg_m", 1.0)),
        "normalize_cost": getattr(sampler, "normalize_cost", False),
        "num_threads": keywords.get("numThreads", 1),
        "warn": getattr(sampler, "warn", True),
    }


def use_eotfast(flow_matcher, **options):
    """Swaps a torchcfm flow matcher's OT sampler for eotfast's :class:`OTPlanSampler`.

    The drop-in gets the old sampler's settings (method from its ``ot_fn``: POT's ``emd``,
    ``sinkhorn``, ``sinkhorn_knopp_unbalanced`` or ``entropic_partial_wasserstein``; its
    ``reg``, ``reg_m``, ``normalize_cost``, ``warn`` and ``numThreads``), then ``options``.
    torchcfm itself is not imported: any object with an ``ot_sampler`` will do.

    Parameters
    ----------
    flow_matcher : torchcfm flow matcher
        One that pairs by OT, e.g. ``ExactOptimalTransportConditionalFlowMatcher`` or
        ``SchrodingerBridgeConditionalFlowMatcher``.
    **options
        :class:`OTPlanSampler` arguments that replace the old sampler's, e.g.
        ``on_device=True``.

    Returns
    -------
    The same flow matcher, whose ``ot_sampler`` is now the drop-in.

    Examples
    --------
    >>> from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher
    >>> fm = use_eotfast(ExactOptimalTransportConditionalFlowMatcher(sigma=0.0))
    >>> t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
    """
    sampler = getattr(flow_matcher, "ot_sampler", None)
    if sampler is None:
        raise TypeError(
            f"use_eotfast(flow_matcher): the flow_matcher, a {type(flow_matcher).__name__}, "
            "has no ot_sampler to replace; flow matchers that pair by OT have one "
            "(ExactOptimalTransportConditionalFlowMatcher, "
            "SchrodingerBridgeConditionalFlowMatcher)"
        )
    settings = _settings_of(sampler, options.get("method"))
    settings.update(options)
    flow_matcher.ot_sampler = OTPlanSampler(**settings)
    return flow_matcher


class _TorchcfmPatch:
    """What :func:`patch_torchcfm` replaced; ``undo()`` (or the end of a ``with``) restores it."""

    def __init__(self, replaced: list[tuple[Any, Any]]):
        self._replaced = replaced

    def undo(self) -> None:
        for module, original in self._replaced:
            module.OTPlanSampler = original
        self._replaced = []

    def __enter__(self) -> _TorchcfmPatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()


def patch_torchcfm() -> _TorchcfmPatch:
    """Makes torchcfm build eotfast's :class:`OTPlanSampler` wherever it builds its own.

    Replaces ``OTPlanSampler`` in ``torchcfm.optimal_transport``,
    ``torchcfm.conditional_flow_matching`` (where the flow matchers build their samplers) and
    the ``torchcfm`` package (which re-exports it), so that flow matchers created afterwards,
    and code that imports the class afterwards, get the drop-in with torchcfm's arguments.
    Samplers and imports made before keep torchcfm's class (see :func:`use_eotfast`).

    Returns
    -------
    A handle: ``.undo()`` restores torchcfm's class; as a context manager
    (``with patch_torchcfm(): ...``) it restores it on exit. Patching twice is harmless.

    Raises
    ------
    ImportError
        If torchcfm is not installed.
    """
    try:
        import torchcfm
        import torchcfm.conditional_flow_matching as cfm_module
        import torchcfm.optimal_transport as ot_module
    except ImportError as error:
        raise ImportError(
            "patch_torchcfm needs torchcfm (pip install torchcfm); eotfast's OTPlanSampler "
            "itself works without it"
        ) from error
    original = ot_module.OTPlanSampler
    replaced = []
    if original is not OTPlanSampler:
        for module in (ot_module, cfm_module, torchcfm):
            if getattr(module, "OTPlanSampler", None) is original:
                module.OTPlanSampler = OTPlanSampler
                replaced.append((module, original))
    return _TorchcfmPatch(replaced)
