"""Backend 'host': for tensors on devices with no eotfast kernel (MPS, XPU, ...). The cost
matrix, the Sinkhorn solve and the row draws are the torch reference's, on the device; the
auction is the C++ kernel (csrc/auction_cpu.cpp) on host copies, through one round trip.

Why the auction leaves the device: the torch reference bids in Jacobi rounds of ~20-40 small
tensor ops each, and a phase ends in long chains of rounds with a single bidder (1,064 rounds
for 128 2-D points). `pair(x, y, method="exact")` with backend="torch" took 16-128x the C++
kernel's time on a 2-core CPU, where an op costs 1-5 us (168 ms against 1.3 ms for 128 2-D
points, 1.0 s against 65 ms for 1024 images: bench/README.md, "The torch auction"). On a GPU
each op is a kernel launch, so its rounds cost no less there, while the round trip is one
synchronization and a copy of the [B, n, m] cost (4 MB at n = 1024 in float32). This is the
second documented exception to eotfast's no-host-round-trip rule, after ``emd``;
``backend="torch"`` keeps every op on the device.
"""

from __future__ import annotations

from torch import Tensor

from eotfast.ops.cpu_backend import auction_cpu
from eotfast.ops.torch_backend import cost_matrix, draw_partners, sinkhorn

__all__ = ["auction", "cost_matrix", "draw_partners", "sinkhorn"]


def auction(cost: Tensor, prices: Tensor, epsilon_start: Tensor, epsilon_final: Tensor,
            scaling: float, max_bids: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The C++ auction (eotfast::auction_cpu, same schema) on host copies of the [B, n, m]
    problem; the columns, prices, epsilons and bid counts are returned on the cost's device."""
    device = cost.device
    # The host round trip (documented): the first copy waits for the device to finish the cost.
    host = [t.to("cpu") for t in (cost, prices, epsilon_start, epsilon_final)]
    solution = auction_cpu(*host, scaling, max_bids)
    return tuple(t.to(device) for t in solution)
