"""pytest bench: shared options and helpers of the benchmark suite.

    pytest bench                                  # the default CPU run (~10 min on 2 cores)
    pytest bench --bench-heavy                    # + n = 4096, d = 12288 and batch 8 at n = 1024
    pytest bench --benchmark-json bench/results/cpu.json && python bench/make_results.py \\
        bench/results/cpu.json                    # -> bench/RESULTS.md and bench/time_vs_n.png

The benchmarks import the installed eotfast (pytest runs with --import-mode=importlib).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for _bench_utils


def pytest_addoption(parser):
    parser.addoption(
        "--bench-heavy", action="store_true", default=False,
        help="also run the large cases (n = 4096, d = 12288, batch 8 at n = 1024)",
    )  # fmt: skip


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: a large case, run with --bench-heavy")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_heavy = pytest.mark.skip(reason="large case: pass --bench-heavy")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "heavy" in item.keywords and not config.getoption("--bench-heavy"):
            item.add_marker(skip_heavy)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Library versions next to pytest-benchmark's CPU description, for RESULTS.md."""
    import importlib.metadata

    import torch

    versions = {}
    for package in ("eotfast", "torch", "pot", "scipy", "numpy", "triton", "torchcfm", "geomloss"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    machine_info["library_versions"] = versions
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cuda_device"] = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else None
    )
