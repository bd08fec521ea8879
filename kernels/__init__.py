"""Triton kernels of eotfast, shipped as ``eotfast.kernels``.

The kernels themselves land with the Triton backend; this package exists now so the wheel
layout (kernels/ installed as eotfast.kernels) is fixed and tested from the start.
"""
