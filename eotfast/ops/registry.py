"""Which implementation runs an op: one record per backend, and the choice among them.

A backend is a module of eotfast.ops that provides the four ops of the pairing path under
the same names, each on flattened [B, ...] batches (eotfast.ops.solve calls them, through
:func:`backend_ops`, and nothing else does):

- ``cost_matrix(x [B, n, d], y [B, m, d]) -> [B, n, m]``: squared Euclidean distances;
- ``sinkhorn(cost [B, n, m], a [B, n], b [B, m], epsilon [B], max_iter, tol, epsilon_start
  [B], scaling, relaxation, reach) -> (f [B, n], g [B, m], n_iter [B], marginal_error [B])``:
  eotfast.ops.common.SINKHORN_SCHEMA, in the record's ``sinkhorn_dtypes``;
- ``draw_partners(cost [B, n, m], g [B, m], epsilon [B], sampling, generator) -> [B, n]``:
  one column per row from the plan's row (Gumbel-max draw, or argmax);
- ``auction(cost [B, n, m], prices [B, m], epsilon_start [B], epsilon_final [B], scaling,
  max_bids) -> (assignment [B, n], prices [B, m], epsilon [B], n_bids [B])``:
  eotfast.ops.common.AUCTION_SCHEMA.

Its record says where it runs, how fast it is there (``rank``: 0 first, for "auto"), whether
it can run in this process, and how to load its module, imported on first use (importing
triton must wait for TRITON_INTERPRET). Adding a backend is one module and one record.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from eotfast.ops.extensions import (
    _C_IMPORT_ERROR,
    _CUDA_IMPORT_ERROR,
    cpu_extension_available,
    cuda_extension_available,
    require_cpu_extension,
    require_cuda_extension,
)

# Looked up without importing triton: TRITON_INTERPRET must be set before that import, and
# a module constant keeps torch.compile from tracing an import inside the compiled step.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through its interpreter (slow;
    for testing). It must be set before triton is first imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA (and ROCm) GPUs, and on the CPU only under the interpreter."""
    if not _TRITON_INSTALLED:
        return False
    if device.type == "cuda":
        return not triton_interpreter_enabled()
    return device.type == "cpu" and triton_interpreter_enabled()


@dataclass(frozen=True)
class Backend:
    name: str
    # Imports and returns the module of eotfast.ops that implements the ops. An import
    # statement, not importlib: torch.compile traces import statements, so a compiled step
    # may be the first to reach a backend without a graph break.
    load: Callable[[], ModuleType]
    where: str  # the tensors it takes, for the README's backend table
    summary: str  # what it is, for the README's backend table
    # device type -> place in "auto"'s order there (0 first); "*": any other device type
    rank: dict[str, int]
    runs_on: Callable[[torch.device], bool]  # can run on this device in this process
    hint: Callable[[torch.device], str]  # why not, and what to use instead
    # its Sinkhorn solves unbalanced problems (a finite reach); the GPU kernels do not
    unbalanced: bool = False
    # the dtypes its Sinkhorn solves in; eotfast.ops.solve casts other costs to the first
    sinkhorn_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)


def _load_triton():
    from eotfast.ops import triton_backend

    return triton_backend


def _load_cuda():
    from eotfast.ops import cuda_backend

    return cuda_backend


def _load_cpu():
    from eotfast.ops import cpu_backend

    return cpu_backend


def _load_torch():
    from eotfast.ops import torch_backend

    return torch_backend


def _load_host():
    from eotfast.ops import host_backend

    return host_backend


def _cpu_hint(device: torch.device) -> str:
    if device.type != "cpu":
        return f"backend='cpu' runs on CPU tensors, got tensors on {device}; use 'torch' or 'auto'"
    return str(_C_IMPORT_ERROR)


def _cuda_hint(device: torch.device) -> str:
    if device.type != "cuda":
        return (
            f"backend='cuda' runs on CUDA tensors, got tensors on {device}; for CPU tensors use "
            "backend='cpu'"
        )
    return str(_CUDA_IMPORT_ERROR)


# Devices whose tensors the host backend takes: those without an eotfast kernel. Meta tensors
# hold no values to copy to the host, so the torch reference (shapes only) serves them.
_KERNEL_DEVICE_TYPES = ("cpu", "cuda", "meta")


def _host_hint(device: torch.device) -> str:
    instead = {"cpu": "'cpu' (the same C++ auction, no copy)", "cuda": "'triton', 'cuda'"}
    if device.type in _KERNEL_DEVICE_TYPES:
        return (
            f"backend='host' is for tensors on devices without an eotfast kernel (MPS, XPU, "
            f"...), got tensors on {device}; use {instead.get(device.type, repr('torch'))} or "
            "'auto'"
        )
    return (
        f"backend='host' runs the C++ auction of eotfast._C, which failed to import "
        f"({_C_IMPORT_ERROR}); use backend='torch'"
    )


def _triton_hint(device: torch.device) -> str:
    if device.type == "cpu" and _TRITON_INSTALLED:
        return (
            "backend='triton' runs on CUDA tensors; for CPU tensors use backend='cpu' (the C++ "
            "kernels), or set TRITON_INTERPRET=1 before importing triton to run the Triton "
            "kernels through the interpreter (for testing)"
        )
    reason = "it runs on CUDA tensors" if _TRITON_INSTALLED else "triton is not installed"
    return f"backend='triton' cannot run on {device} ({reason}); use backend='torch'"


BACKENDS: dict[str, Backend] = {
    record.name: record
    for record in (
        Backend(
            name="triton",
            load=_load_triton,
            where="CUDA tensors (CPU tensors under `TRITON_INTERPRET=1`, for testing)",
            summary="Triton kernels (`kernels/`): tiled cost matrix on `tl.dot`, log-domain "
            "Sinkhorn in one launch (a problem spread over several programs that meet at grid "
            "barriers, or one program per problem for batches), per-row partner draws that "
            "never form the plan",
            rank={"cuda": 0, "cpu": 3},  # on CPU tensors: the interpreter, slowest
            runs_on=triton_runs_on,
            hint=_triton_hint,
            sinkhorn_dtypes=(torch.float32,),
        ),
        Backend(
            name="cuda",
            load=_load_cuda,
            where="CUDA tensors",
            summary="CUDA kernels (`csrc/cuda/`) on the caller's current stream: cost matrix, "
            "Sinkhorn with one thread block per problem; the auction is the Triton kernel's "
            "(the torch reference's where Triton cannot run)",
            rank={"cuda": 1},
            runs_on=lambda device: device.type == "cuda" and cuda_extension_available(),
            hint=_cuda_hint,
            sinkhorn_dtypes=(torch.float32,),
        ),
        Backend(
            name="cpu",
            load=_load_cpu,
            where="CPU tensors",
            summary="C++ kernels (`csrc/`): one fused sweep over the cost per iteration, "
            "vectorized exp, threads over rows or over the batch (`torch.get_num_threads()`)",
            rank={"cpu": 0},
            runs_on=lambda device: device.type == "cpu" and cpu_extension_available(),
            hint=_cpu_hint,
            unbalanced=True,
        ),
        Backend(
            name="host",
            load=_load_host,
            where="tensors on other devices (MPS, XPU, ...)",
            summary="the `torch` ops on the device, except the auction: the C++ kernel of `cpu` "
            "on host copies of the cost, one round trip (the torch reference's Jacobi rounds "
            "took 16-128x its time on a CPU)",
            rank={"*": 0},
            runs_on=lambda device: (
                device.type not in _KERNEL_DEVICE_TYPES and cpu_extension_available()
            ),
            hint=_host_hint,
            unbalanced=True,
        ),
        Backend(
            name="torch",
            load=_load_torch,
            where="any device",
            summary="pure PyTorch reference, the oracle of the tests",
            rank={"cuda": 2, "cpu": 1, "*": 1},  # MPS, XPU, ...: after host (no C++ build)
            runs_on=lambda device: True,
            hint=lambda device: "",
            unbalanced=True,
        ),
    )
}
BACKEND_NAMES = ("auto", *BACKENDS)


def _rank(backend: Backend, device: torch.device) -> int | None:
    return backend.rank.get(device.type, backend.rank.get("*"))


def available_backends(
    device: torch.device | str = "cpu", *, unbalanced: bool = False
) -> list[str]:
    """Backends that can run on `device` in this process, fastest first; with
    ``unbalanced``, those whose Sinkhorn solves unbalanced problems (a finite ``reach``)."""
    device = torch.device(device)
    runnable = [
        b
        for b in BACKENDS.values()
        if _rank(b, device) is not None and b.runs_on(device) and (b.unbalanced or not unbalanced)
    ]
    return [b.name for b in sorted(runnable, key=lambda b: _rank(b, device))]


def resolve_backend(backend: str, device: torch.device, *, unbalanced: bool = False) -> str:
    """Turns 'auto' into the fastest backend for `device` (among those that solve unbalanced
    problems, with ``unbalanced``); rejects names that cannot run there."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        return available_backends(device, unbalanced=unbalanced)[0]
    record = BACKENDS[backend]
    if unbalanced and not record.unbalanced:
        raise ValueError(
            f"reach (unbalanced OT) is not implemented by backend={backend!r}, whose GPU "
            "kernels solve balanced problems only; use backend='torch' (any device), 'cpu' (CPU "
            "tensors) or 'auto'"
        )
    if _rank(record, device) is None or not record.runs_on(device):
        if backend == "cpu" and device.type == "cpu":
            require_cpu_extension()
        if backend == "cuda" and device.type == "cuda":
            require_cuda_extension()
        raise ValueError(record.hint(device))
    return backend


def backend_table() -> str:
    """The README's backend table, in markdown, from the records."""
    rows = ["| backend | runs on | what it is |", "| --- | --- | --- |"]
    rows += [f"| `{b.name}` | {b.where} | {b.summary} |" for b in BACKENDS.values()]
    orders = []
    for device, label in (("cpu", "CPU tensors"), ("cuda", "CUDA tensors"), ("*", "others")):
        ranked = sorted(
            (b for b in BACKENDS.values() if device in b.rank), key=lambda b: b.rank[device]
        )
        names = ", ".join(f"`{b.name}`" for b in ranked)
        orders.append(f"{label}: {names}")
    rows.append(f"| `auto` | | the first that can run, in this order; {'; '.join(orders)} |")
    return "\n".join(rows)


def backend_ops(backend: str) -> ModuleType:
    """The module of a resolved backend name: cost_matrix, sinkhorn, draw_partners, auction."""
    return BACKENDS[backend].load()
