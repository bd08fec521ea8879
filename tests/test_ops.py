"""Every registered op passes torch.library.opcheck (schema, fake implementation, dispatch)."""

import pytest
import torch

import eotfast  # noqa: F401  (registers the ops)

cost = torch.rand(2, 9, 7)
a = torch.full((2, 9), 1 / 9)
b = torch.full((2, 7), 1 / 7)
epsilon = torch.full((2,), 0.1)


@pytest.mark.parametrize(
    "op,args",
    [
        (torch.ops.eotfast.sinkhorn_torch.default, (cost, a, b, epsilon, 50, 1e-6)),
        (torch.ops.eotfast.sinkhorn_cpu.default, (cost, a, b, epsilon, 50, 1e-6)),
        (
            torch.ops.eotfast.sinkhorn_cpu.default,
            (cost.double(), a.double(), b.double(), epsilon.double(), 50, 0.0),
        ),
        (torch.ops.eotfast.emd.default, (cost.double(), a.double(), b.double(), 100_000)),
        (torch.ops.eotfast.assignment.default, (cost.mT.contiguous(),)),
    ],
)
def test_opcheck(op, args):
    torch.library.opcheck(op, args)
