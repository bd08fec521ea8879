"""Triton kernels of eotfast, shipped as ``eotfast.kernels``.

- ``cost_matrix``: batched squared Euclidean distances on ``tl.dot`` tiles.
- ``sinkhorn``: log-domain Sinkhorn in one launch, each problem on one or several programs
  (grid barriers between them), each stopping on the device.
- ``draw_partners``: one partner per plan row (Gumbel-max or argmax) without forming the plan.
- ``auction``: the batched auction (assignment) solver in one launch, one program per problem
  (Jacobi bidding, epsilon scaling), each stopping on the device.

Each module's ``launch_*`` function is registered as a torch op in
``eotfast.ops.triton_backend`` and reached through the public functions with
``backend="triton"``. Importing a module here imports triton: set ``TRITON_INTERPRET=1``
before that to run the kernels on CPU tensors.
"""
