"""eotfast: fast, trustworthy mini-batch optimal-transport pairing for PyTorch.

>>> import torch, eotfast
>>> x, y = torch.randn(256, 3072), torch.randn(256, 3072)
>>> j = eotfast.pair(x, y)            # (x[i], y[j[i]]) are the OT pairs
>>> result = eotfast.sinkhorn(eotfast.cost_matrix(x, y))
"""

from eotfast.cost import cost_matrix
from eotfast.divergence import SinkhornDivergence, sinkhorn_divergence
from eotfast.entropic import SinkhornResult, epsilon_from_reg, sinkhorn
from eotfast.exact import emd
from eotfast.lap import AuctionResult, assignment, auction, linear_sum_assignment
from eotfast.ops import cpu_backend, host, torch_backend  # noqa: F401  (registers their ops)
from eotfast.ops.registry import (
    available_backends,
    cpu_extension_available,
    cuda_extension_available,
)
from eotfast.pairing import pair

__version__ = "0.1.0"

__all__ = [
    "AuctionResult",
    "assignment",
    "auction",
    "available_backends",
    "cost_matrix",
    "cpu_extension_available",
    "cuda_extension_available",
    "emd",
    "epsilon_from_reg",
    "linear_sum_assignment",
    "pair",
    "sinkhorn",
    "sinkhorn_divergence",
    "SinkhornDivergence",
    "SinkhornResult",
]
