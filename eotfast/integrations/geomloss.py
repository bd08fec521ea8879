r"""A drop-in for GeomLoss's ``SamplesLoss("sinkhorn", p=2)``, solved by eotfast.

GeomLoss (Feydy et al., 2019) computes the Sinkhorn divergence between sampled measures with
a fixed annealing schedule: about ten iterations, whatever accuracy the problem then has.
:class:`SamplesLoss` here takes the same constructor and calls and computes the same
quantity with :func:`eotfast.sinkhorn_divergence`, which iterates until every problem's
marginal error is below ``tol``:

>>> from eotfast.integrations.geomloss import SamplesLoss
>>> loss = SamplesLoss("sinkhorn", p=2, blur=0.05)
>>> value = loss(x, y)              # x [N, D], y [M, D]: a scalar; [B, N, D]: a [B] vector
>>> value = loss(a, x, b, y)        # with weights a [N] (or [B, N]), b [M]
>>> F, G = SamplesLoss(potentials=True)(x, y)

GeomLoss's conventions are kept: cost |x - y|^2 / 2, epsilon = blur^2, rho = reach^2, the
value of GeomLoss's ``sinkhorn_cost`` (with ``debias=False`` and non-unit masses it differs
from the primal OT by GeomLoss's constant, which is kept too), potentials F, G with the
plan a_i b_j exp((F_i + G_j - |x_i - y_j|^2 / 2) / epsilon) (debiased: F_ab - F_aa and
G_ab - G_bb, as GeomLoss returns them). Beyond GeomLoss, keyword-only: ``tol``, ``max_iter``
and ``return_plan`` (the plan of OT(a, b) from the same solve, [N, M] or [B, N, M], returned
after the value or the potentials).

Not covered: losses other than "sinkhorn", p other than 2, custom ``cost`` or ``kernel``,
cluster labels (the six-argument call) and ``cluster_scale``. With geomloss installed those
calls go to ``geomloss.SamplesLoss`` itself; without it they raise NotImplementedError.
geomloss is not a dependency of eotfast.

Options that only steer GeomLoss's implementation are accepted and have no effect here:
``diameter`` (eotfast's annealing starts from the costs' exact range), ``truncate`` (for its
multiscale backend) and ``backend`` "tensorized", "online" and "multiscale" (eotfast's
fastest backend for the device runs; eotfast's names "torch", "cpu", "host", "triton" and
"cuda" pick one). ``scaling`` is GeomLoss's annealing ratio of blur per step: eotfast's epsilon then
shrinks by scaling^2 per iteration, from the costs' range down to epsilon, and iterates there
until ``tol``.
"""

from __future__ import annotations

import importlib.util

import torch

from eotfast.divergence import sinkhorn_divergence
from eotfast.ops.registry import BACKEND_NAMES

__all__ = ["SamplesLoss", "GEOMLOSS_BACKENDS"]

GEOMLOSS_BACKENDS = ("auto", "tensorized", "online", "multiscale")
# The loss is GeomLoss's quantity for its cost |x - y|^2 / 2; eotfast's cost is |x - y|^2.
# OT_epsilon,rho(C / 2) = OT_2 epsilon,2 rho(C) / 2, and the potentials halve likewise.
COST_SCALE = 0.5


class SamplesLoss(torch.nn.Module):
    """GeomLoss's ``SamplesLoss`` for ``loss="sinkhorn"`` and ``p=2`` (module docstring).

    Parameters (GeomLoss's; see the module docstring for those without effect)
    ----------
    loss : str
        "sinkhorn" (others delegate to geomloss).
    p : int
        2 (others delegate to geomloss): cost |x - y|^2 / 2.
    blur : float
        epsilon = blur^2 in the cost's units: the length scale below which the transport
        plan blurs.
    reach : float or None
        Unbalanced OT with rho = reach^2 (KL-penalized marginals); None: balanced.
    diameter, truncate, cluster_scale, verbose
        Accepted (cluster_scale must be None); no effect here.
    scaling : float in (0, 1)
        Annealing ratio of blur per step (epsilon shrinks by scaling^2).
    cost, kernel
        None (others delegate to geomloss).
    debias : bool
        The Sinkhorn divergence (True) or the entropic OT value (False).
    potentials : bool
        Return the potentials (F, G) instead of the value: (B, N) and (B, M), B = 1 for a
        single measure, as GeomLoss's tensorized and online backends return them.
    backend : str
        One of GeomLoss's backends (no effect) or of eotfast's ("torch", "cpu", "host",
        "triton", "cuda").
    tol : float
        eotfast: largest marginal error of each solve (default 1e-3; see
        :func:`eotfast.sinkhorn_divergence`).
    max_iter : int
        eotfast: most iterations per solve.
    return_plan : bool
        eotfast: also return the plan of OT(a, b), last.
    """

    def __init__(
        self,
        loss: str = "sinkhorn",
        p: int = 2,
        blur: float = 0.05,
        reach: float | None = None,
        diameter: float | None = None,
        scaling: float = 0.5,
        truncate: float | None = 5,
        cost=None,
        kernel=None,
        cluster_scale: float | None = None,
        debias: bool = True,
        potentials: bool = False,
        verbose: bool = False,
        backend: str = "auto",
        *,
        tol: float = 1e-3,
        max_iter: int = 1000,
        return_plan: bool = False,
    ):
        super().__init__()
        self.loss, self.p, self.blur, self.reach = loss, p, blur, reach
        self.diameter, self.scaling, self.truncate = diameter, scaling, truncate
        self.cost, self.kernel, self.cluster_scale = cost, kernel, cluster_scale
        self.debias, self.potentials, self.verbose, self.backend = (
            debias, potentials, verbose, backend,
        )  # fmt: skip
        self.tol, self.max_iter, self.return_plan = tol, max_iter, return_plan
        uncovered = self._uncovered()
        self._geomloss = None
        if uncovered:
            self._geomloss = self._geomloss_loss(uncovered)
            return
        for name, value in (("blur", blur), ("scaling", scaling)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if not scaling < 1:
            raise ValueError(f"scaling must be a number in (0, 1), got {scaling!r}")
        if reach is not None and (
            isinstance(reach, bool) or not isinstance(reach, (int, float)) or not reach > 0
        ):
            raise ValueError(f"reach must be None or a number > 0, got {reach!r}")
        if backend not in GEOMLOSS_BACKENDS and backend not in BACKEND_NAMES:
            raise ValueError(
                f"backend must be one of GeomLoss's {GEOMLOSS_BACKENDS} or eotfast's "
                f"{BACKEND_NAMES}, got {backend!r}"
            )

    def _uncovered(self) -> str:
        """What in the settings eotfast does not compute ('' if nothing)."""
        if self.loss != "sinkhorn":
            return f"loss={self.loss!r}"
        if self.p != 2:
            return f"p={self.p!r}"
        if self.cost is not None:
            return "a custom cost"
        if self.kernel is not None:
            return "a custom kernel"
        if self.cluster_scale is not None:
            return "cluster_scale (the multiscale backend)"
        return ""

    def _geomloss_loss(self, uncovered: str):
        """GeomLoss's own SamplesLoss with these settings, for what eotfast does not compute
        (``uncovered`` names it); NotImplementedError saying so without geomloss."""
        if importlib.util.find_spec("geomloss") is None:
            raise NotImplementedError(
                f"eotfast's SamplesLoss covers GeomLoss's loss='sinkhorn' with p=2 and its "
                f"squared Euclidean cost; {uncovered} is GeomLoss's own (pip install "
                "geomloss, and this class hands such calls to it)"
            )
        import geomloss

        return geomloss.SamplesLoss(
            loss=self.loss, p=self.p, blur=self.blur, reach=self.reach, diameter=self.diameter,
            scaling=self.scaling, truncate=self.truncate, cost=self.cost, kernel=self.kernel,
            cluster_scale=self.cluster_scale, debias=self.debias, potentials=self.potentials,
            verbose=self.verbose,
            backend=self.backend if self.backend in GEOMLOSS_BACKENDS else "auto",
        )  # fmt: skip

    def forward(self, *args):
        if self._geomloss is not None:
            if self.return_plan:
                raise NotImplementedError("return_plan is eotfast's: GeomLoss has no plan")
            return self._geomloss(*args)
        if len(args) == 6:
            return self._geomloss_loss("cluster labels (the six-argument call)")(*args)
        if len(args) == 2:
            (x, y), a, b = args, None, None
        elif len(args) == 4:
            a, x, b, y = args
        else:
            raise ValueError(
                "SamplesLoss takes two (x, y), four (a, x, b, y) or six (l_x, a, x, l_y, b, y) "
                f"arguments, got {len(args)}"
            )
        for name, points in (("x", x), ("y", y)):
            if not isinstance(points, torch.Tensor) or points.dim() not in (2, 3):
                shape = tuple(points.shape) if isinstance(points, torch.Tensor) else points
                raise ValueError(
                    f"{name} must be a (N, D) or (B, N, D) tensor of samples, got {shape}"
                )
        if x.dim() != y.dim():
            raise ValueError(
                f"x and y must both be (N, D) or both (B, N, D), got {tuple(x.shape)} and "
                f"{tuple(y.shape)}"
            )
        a, b = _weights(a, x), _weights(b, y)
        result = sinkhorn_divergence(
            x, y, a, b,
            reg=self.blur**2 / COST_SCALE,
            relative_reg=False,
            reach=None if self.reach is None else self.reach**2 / COST_SCALE,
            debias=self.debias, batch_dims=x.dim() - 2, tol=self.tol, max_iter=self.max_iter,
            scaling=self.scaling**2, backend=self.backend if self.backend in BACKEND_NAMES
            else "auto", return_result=True, return_plan=self.return_plan,
        )  # fmt: skip
        if self.potentials:
            # GeomLoss's shapes: (B, N) and (B, M), with B = 1 for a single measure.
            f, g = COST_SCALE * result.f, COST_SCALE * result.g
            out = (f.reshape(-1, f.shape[-1]), g.reshape(-1, g.shape[-1]))
        else:
            value = COST_SCALE * result.value
            if not self.debias:
                # GeomLoss's value leaves out the dual's constant epsilon (m_a m_b - (m_a +
                # m_b) / 2), 0 for unit masses (see eotfast.sinkhorn_divergence).
                mass_a = 1.0 if a is None else a.sum(-1)
                mass_b = 1.0 if b is None else b.sum(-1)
                value = value - self.blur**2 * (mass_a * mass_b - (mass_a + mass_b) / 2)
            out = (value,)
        if self.return_plan:
            out = (*out, result.plan)
        return out[0] if len(out) == 1 else out


def _weights(weights, points):
    """GeomLoss's weight shapes, (N,) / (N, 1) or (B, N) / (B, N, 1), as (N,) or (B, N)."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be tensors, got {type(weights).__name__}")
    if weights.dim() == points.dim() and weights.shape[-1] == 1:
        weights = weights.squeeze(-1)
    return weights
