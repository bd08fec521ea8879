"""Every registered op passes torch.library.opcheck (schema, fake implementation, dispatch),
from one set of sample inputs; an op registered without one fails here."""

import math

import pytest
import torch
from oracles import assert_refused_eagerly_and_faked, backend_device

import eotfast  # noqa: F401  (registers the CPU and host ops)
from eotfast.ops import cuda_backend, triton_backend  # noqa: F401  (register theirs)


def sample_inputs(device: torch.device) -> dict[str, tuple]:
    """Arguments of every registered op, on `device`."""
    cost = torch.rand(2, 9, 7, device=device)
    a = torch.full((2, 9), 1 / 9, device=device)
    b = torch.full((2, 7), 1 / 7, device=device)
    epsilon = torch.full((2,), 0.1, device=device)
    x, y = torch.randn(2, 9, 8, device=device), torch.randn(2, 7, 8, device=device)
    # Epsilon scaling from 4 epsilon down, over-relaxed at the target; balanced (reach inf).
    sinkhorn = (cost, a, b, epsilon, 50, 1e-6, 4 * epsilon, 0.5, 1.5, math.inf)
    # cost^T [2, 7, 9]: the auction needs n <= m.
    auction = (
        cost.mT.contiguous(),
        torch.zeros(2, 9, device=device),
        torch.ones(2, device=device),
        torch.full((2,), 1e-3, device=device),
        0.2,
        10_000,
    )
    return {
        "sinkhorn_torch": sinkhorn,
        "sinkhorn_cpu": sinkhorn,
        "sinkhorn_triton": sinkhorn,
        "sinkhorn_cuda": sinkhorn,
        "cost_matrix_triton": (x, y),
        "cost_matrix_cuda": (x, y),
        "draw_partners_triton": (cost, b, epsilon, torch.tensor([7], device=device), True),
        "emd_pot": (cost.double(), a.double(), b.double(), 100_000),
        "assignment_scipy": (cost.mT.contiguous(),),
        "auction_cpu": auction,
        "auction_torch": auction,
        "auction_triton": auction,
    }


# The device each op runs on, and whether it can run in this process.
OP_BACKEND = {
    "sinkhorn_torch": "torch", "sinkhorn_cpu": "cpu", "sinkhorn_triton": "triton",
    "sinkhorn_cuda": "cuda", "cost_matrix_triton": "triton", "cost_matrix_cuda": "cuda",
    "draw_partners_triton": "triton", "emd_pot": "torch", "assignment_scipy": "torch",
    "auction_cpu": "cpu",
    "auction_torch": "torch",
    "auction_triton": "triton",
}  # fmt: skip


def registered_ops() -> set[str]:
    return {
        name.removeprefix("eotfast::")
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("eotfast::")
    }


def test_every_registered_op_has_sample_inputs():
    assert registered_ops() == set(sample_inputs(torch.device("cpu")))


@pytest.mark.parametrize("op", sorted(OP_BACKEND))
def test_opcheck(op):
    backend = OP_BACKEND[op]
    device = backend_device(backend)
    if backend not in eotfast.available_backends(device):
        pytest.skip(f"backend {backend} cannot run here")
    args = sample_inputs(device)[op]
    function = getattr(torch.ops.eotfast, op).default
    if backend in ("triton", "cuda"):
        # Schema and fake only: the kernels' outputs are not differentiable, and opcheck's
        # autograd and AOT tests of a triton_op need a GPU's compiled kernels.
        torch.library.opcheck(function, args, test_utils=("test_schema", "test_faketensor"))
    else:
        torch.library.opcheck(function, args)


SINKHORN_OPS = [op for op in OP_BACKEND if op.startswith("sinkhorn_")]


@pytest.mark.parametrize("op", ["sinkhorn_torch", "sinkhorn_cpu"])
def test_opcheck_unbalanced(op):
    # The ops that solve unbalanced problems, with a finite reach and marginals of unequal mass.
    device = backend_device(OP_BACKEND[op])
    if OP_BACKEND[op] not in eotfast.available_backends(device):
        pytest.skip(f"backend {OP_BACKEND[op]} cannot run here")
    cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling, relaxation, _ = sample_inputs(
        device
    )[op]
    args = (cost, a, 2 * b, epsilon, max_iter, tol, epsilon_start, scaling, relaxation, 0.3)
    torch.library.opcheck(getattr(torch.ops.eotfast, op).default, args)


@pytest.mark.parametrize("op", ["sinkhorn_triton", "sinkhorn_cuda"])
def test_gpu_sinkhorn_ops_refuse_a_finite_reach(op):
    backend = OP_BACKEND[op]
    device = backend_device(backend)
    if backend not in eotfast.available_backends(device):
        pytest.skip(f"backend {backend} cannot run here")
    args = (*sample_inputs(device)[op][:-1], 0.3)
    with pytest.raises(ValueError, match=f"{op}: reach=0.3 .unbalanced OT. is not implemented"):
        getattr(torch.ops.eotfast, op).default(*args)


@pytest.mark.parametrize("op", SINKHORN_OPS)
@pytest.mark.parametrize(
    "argument,bad,match",
    [
        ("a", lambda t: t[:, :-1], r"a must have shape \(2, 9\)"),
        ("b", lambda t: t[0], r"b must have shape \(2, 7\)"),
        ("epsilon", lambda t: t[:1], r"epsilon must have shape \(2,\)"),
        ("cost", lambda t: t[0], r"cost must be a non-empty \[B, n, m\]"),
        ("a", lambda t: t.double(), "a must have cost's dtype"),
        ("max_iter", lambda value: 0, "max_iter must be >= 1"),
        ("epsilon_start", lambda t: t.double(), "epsilon_start must have cost's dtype"),
        ("scaling", lambda value: 1.0, r"scaling must be a number in \(0, 1\)"),
        ("relaxation", lambda value: 2.0, r"relaxation must be a number in \[1, 2\)"),
        ("reach", lambda value: 0.0, r"reach must be a number > 0 \(inf: balanced\)"),
    ],
)
def test_sinkhorn_ops_refuse_malformed_arguments_before_any_kernel(op, argument, bad, match):
    # The ops are public and hand data pointers to kernels: a wrong shape must be an error
    # naming the argument, never a read past a buffer; the fakes check the same.
    from torch._subclasses.fake_tensor import FakeTensorMode

    backend = OP_BACKEND[op]
    device = backend_device(backend)
    if backend not in eotfast.available_backends(device):
        pytest.skip(f"backend {backend} cannot run here")
    names = (
        "cost", "a", "b", "epsilon", "max_iter", "tol", "epsilon_start", "scaling", "relaxation",
        "reach",
    )  # fmt: skip
    args = dict(zip(names, sample_inputs(device)[op], strict=True))
    args[argument] = bad(args[argument])
    function = getattr(torch.ops.eotfast, op).default
    with pytest.raises((ValueError, TypeError), match=match):
        function(*args.values())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in args.values()]
        with pytest.raises((ValueError, TypeError), match=match):
            function(*fake)


@pytest.mark.parametrize("op", SINKHORN_OPS)
@pytest.mark.parametrize(
    "argument,value",
    [("epsilon", 0.0), ("epsilon", -1.0), ("epsilon", math.nan), ("epsilon", math.inf),
     ("epsilon", 1e-45), ("epsilon_start", 0.0), ("epsilon_start", math.nan)],
)  # fmt: skip
def test_sinkhorn_ops_refuse_epsilons_that_are_not_positive_normal_numbers(op, argument, value):
    # One value check per schema, in every backend's op: sinkhorn_cpu accepted
    # epsilon_start = 0 and sinkhorn_torch a NaN epsilon, and pair(..., reg=1e-45) compiled
    # (whose edge checks of values are skipped while tracing) drew pairs from a garbage plan.
    backend = OP_BACKEND[op]
    device = backend_device(backend)
    if backend not in eotfast.available_backends(device):
        pytest.skip(f"backend {backend} cannot run here")
    if device.type != "cpu":
        pytest.skip("values are checked on CPU tensors only (reading GPU values would sync)")
    args = list(sample_inputs(device)[op])
    position = {"epsilon": 3, "epsilon_start": 6}[argument]
    args[position] = args[position].clone()
    args[position][1] = value
    with pytest.raises(ValueError, match=f"{op}: {argument} of problem 1 is .* outside"):
        getattr(torch.ops.eotfast, op).default(*args)


@pytest.mark.parametrize(
    "op,bad,match",
    [
        ("emd_pot", lambda c, a, b: (c, a[:, :-1], b, 100), r"emd_pot: a must have shape \(2, 9\)"),
        ("emd_pot", lambda c, a, b: (c, a, b[0], 100), r"emd_pot: b must have shape \(2, 7\)"),
        ("emd_pot", lambda c, a, b: (c[0], a, b, 100), r"emd_pot: cost must be a non-empty"),
        ("assignment_scipy", lambda c, a, b: (c[0].mT,), r"assignment_scipy: cost must be a"),
        ("assignment_scipy", lambda c, a, b: (c,), r"assignment_scipy: .*must have n <= m"),
    ],
)  # fmt: skip
def test_host_ops_refuse_malformed_arguments(op, bad, match):
    # emd_pot answered a marginal of the wrong length with POT's bare AssertionError, and
    # assignment_scipy a 2-D cost or n > m with numpy's and scipy's own errors.
    cost, a, b = sample_inputs(torch.device("cpu"))["emd_pot"][:3]  # [2, 9, 7], [2, 9], [2, 7]
    assert_refused_eagerly_and_faked(getattr(torch.ops.eotfast, op).default, bad(cost, a, b), match)


def test_op_registration_refuses_annotations_that_differ_from_the_schema():
    """torch 2.11's triton_op infers the schema from the function's annotations even when one
    is given: an unannotated implementation failed to register there (`import eotfast`
    raised). Every op is registered through sinkhorn_op / auction_op, which compare the two
    (every backend module imported here passed that check on import)."""
    from eotfast.ops.common import auction_op, sinkhorn_op

    def sinkhorn_misannotated(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return cost

    def auction_unannotated(cost, prices, epsilon_start, epsilon_final, scaling, max_bids):
        return cost

    with pytest.raises(TypeError, match="eotfast::sinkhorn_misannotated: the implementation's"):
        sinkhorn_op()(sinkhorn_misannotated)
    with pytest.raises(TypeError, match="eotfast::auction_unannotated: .* schema none"):
        auction_op()(auction_unannotated)
