import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors; the variable
# must be set before triton is first imported (eotfast imports it only when asked for).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # for oracles.py, as the test files import it

from oracles import backend_device, marginals  # noqa: E402

import eotfast  # noqa: E402
from eotfast.ops.registry import BACKENDS  # noqa: E402


# ----------------------------------------------------------------------------- backends
def _backend_param(name: str):
    device = backend_device(name)
    runs = eotfast.available_backends(device)
    marks = [pytest.mark.skipif(name not in runs, reason=f"backend {name} cannot run here")]
    if name == "triton" and device.type == "cpu":
        marks.append(pytest.mark.interpreter)
    return pytest.param(name, marks=marks, id=name)


# Every backend of the registry: torch and cpu everywhere, triton under the interpreter on a
# machine without a GPU, cuda only with one. The C++ one must be built (test_build.py), so a
# missing extension fails loudly there instead of silently skipping here. Not host, which
# serves devices the tests have none of (MPS, XPU): test_pair.py runs it on CPU tensors that
# stand in for them.
ALL_BACKENDS = [_backend_param(name) for name in BACKENDS if name != "host"]


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device(backend):
    return backend_device(backend)


@pytest.fixture
def one_thread_for_the_torch_reference(request):
    """The torch reference's rounds are a few small tensor ops each: on a shared 2-core
    machine, handing each to a second thread costs more than it saves (measured, one
    200 x 257 problem: 2.8 s with one thread, 51 s with two while other jobs ran)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "torch":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter: the Triton interpreter on CPU tensors (slow: small sizes)"
    )


# ----------------------------------------------------------------------------- generators
@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def random_problem():
    """A random OT problem: cost [*batch, n, m] and marginals (None, None when uniform)."""

    def make(batch=(), n=7, m=5, dtype=torch.float64, uniform=True, scale=1.0):
        cost = scale * torch.rand(*batch, n, m, dtype=dtype)
        if uniform:
            return cost, None, None
        return (cost, *marginals(batch, n, m, dtype))

    return make


@pytest.fixture
def clustered_domains():
    """Two image-like domains (d = 3072, values in [-1, 1]) drawn around shared cluster
    centres, as unpaired source and target batches of a translation task."""

    def make(n=256, d=3072, clusters=8, spread=0.3, seed=0):
        gen = torch.Generator().manual_seed(seed)
        centres = torch.rand(clusters, d, generator=gen) * 2 - 1

        def domain():
            labels = torch.randint(clusters, (n,), generator=gen)
            return (centres[labels] + spread * torch.randn(n, d, generator=gen)).clamp(-1, 1)

        return domain(), domain()

    return make


# ------------------------------------------------------------------ the trainer (train.py)
TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"

# TrainConfig options small enough for a few seconds per run on 2 cores.
TINY_TRAINING = dict(
    steps=3, batch_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
    attention_levels=(1,), image_size=16, eval_size=8, sample_steps=2, checkpoint_every=2,
    log_every=1, compile=False, timesteps=50,
)  # fmt: skip

# The command-line options of a tiny two-step run (eager, exact pairing).
TINY_TRAINING_ARGS = ["--steps", "2", "--batch-size", "4", "--base-channels", "8",
                      "--channel-mults", "1,2", "--attention-levels", "1", "--eval-size", "4",
                      "--sample-steps", "2", "--timesteps", "50", "--no-compile",
                      "--no-progress", "--ot", "exact"]  # fmt: skip


@pytest.fixture
def tiny() -> dict:
    """The options of a tiny training run, as a dict of TrainConfig fields (a copy)."""
    return dict(TINY_TRAINING)


@pytest.fixture
def tiny_args() -> list[str]:
    """train.py's options of a tiny two-step run; the first two are ``--steps 2``."""
    return list(TINY_TRAINING_ARGS)


@pytest.fixture
def tiny_config():
    """``tiny_config(folder, **overrides)``: the tiny TrainConfig, its run in folder/run."""
    from eotfast.ddpm.config import TrainConfig

    def make(folder: Path, **overrides):
        return TrainConfig(**{**TINY_TRAINING, "out_dir": str(folder / "run"), **overrides})

    return make


@pytest.fixture
def run_cli():
    """``run_cli(*args)``: train.py in a new interpreter, from the repository root."""
    import subprocess

    def run(*args, timeout=300):
        return subprocess.run(
            [sys.executable, str(TRAIN_PY), *args], capture_output=True, text=True,
            timeout=timeout, cwd=TRAIN_PY.parent,
        )  # fmt: skip

    return run


@pytest.fixture
def train_losses():
    """``train_losses(out_dir)``: {step: loss} of the train records in out_dir/metrics.jsonl."""
    import json

    def read(out_dir: Path) -> dict[int, float]:
        lines = (out_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}

    return read


@pytest.fixture(scope="session")
def train_cli():
    """train.py as a module, to call its main() in-process (no interpreter start per case)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cli_error(train_cli, capsys):
    """``cli_error(*args)``: train.py's main in-process; asserts exit code 2 and one line on
    stderr, and returns that line."""

    def run(*args) -> str:
        try:
            code = train_cli.main([str(a) for a in args])
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
        err = capsys.readouterr().err
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    return run
