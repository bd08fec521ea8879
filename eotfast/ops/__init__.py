"""The ops behind the public functions, one home for all of them.

    registry.py       one record per backend: where it runs, its rank for "auto", its module
    extensions.py     the compiled modules eotfast._C and eotfast._cuda, imported once
    common.py         the result type, the epsilon rule, the fake/allocator, value checks,
                      marginal broadcasting, the float32 round trip
    torch_backend.py  the PyTorch reference of every op (eotfast::sinkhorn_torch, ::auction_torch)
    cpu_backend.py    eotfast::sinkhorn_cpu, ::auction_cpu, the C++ kernels of csrc/
    triton_backend.py eotfast::cost_matrix_triton, ::sinkhorn_triton, ::draw_partners_triton,
                      ::auction_triton
    cuda_backend.py   eotfast::cost_matrix_cuda, ::sinkhorn_cuda, the kernels of csrc/cuda/
    host.py           eotfast::emd_pot, ::assignment_scipy, the host solvers (POT, scipy)
    solve.py          checks, the shifted Sinkhorn solve and the dispatch through the registry

Registered ops are named ``<op>[_<variant>]_<backend>``. The public modules (eotfast.cost,
eotfast.sinkhorn, eotfast.assignment, eotfast.exact, eotfast.pairing) import from here, never
the other way.
"""
