"""The installed package has what the build promises."""

import importlib

import eotfast


def test_cpu_extension_is_built_and_auto_picks_it():
    assert eotfast.cpu_extension_available(), "eotfast._C did not import: run `pip install .`"
    assert eotfast.available_backends("cpu")[0] == "cpu"


def test_triton_kernels_ship_as_eotfast_kernels():
    assert importlib.import_module("eotfast.kernels").__name__ == "eotfast.kernels"
