"""eotfast.integrations.geomloss.SamplesLoss against GeomLoss's SamplesLoss itself, on the
same calls: values, potentials and gradients (GeomLoss run with scaling 0.9999, ~10^4
annealing steps, so that it converges), and against finite differences where GeomLoss's own
gradient is not that of its value (unbalanced)."""

import subprocess
import sys

import pytest
import torch

from eotfast.integrations.geomloss import SamplesLoss

geomloss = pytest.importorskip("geomloss")

CONVERGED = dict(tol=1e-12, max_iter=10**5)


def clouds(n=40, m=30, batch=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, 3, generator=gen, dtype=torch.float64)
    y = 0.7 * torch.randn(*batch, m, 3, generator=gen, dtype=torch.float64) + 0.5
    a = torch.rand(*batch, n, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(*batch, m, generator=gen, dtype=torch.float64) + 0.1
    return x, y, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def theirs(**options):
    return geomloss.SamplesLoss("sinkhorn", scaling=0.9999, backend="tensorized", **options)


@pytest.mark.parametrize("reach", [None, 1.0])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("mass", [1.0, 2.0])  # GeomLoss's constant for non-unit masses kept
@pytest.mark.parametrize("batch", [(), (2,)])
def test_values_match_geomloss(reach, debias, mass, batch):
    x, y, a, b = clouds(batch=batch)
    options = dict(blur=0.3, reach=reach, debias=debias)
    expected = theirs(**options)(mass * a, x, mass * b, y)
    ours = SamplesLoss("sinkhorn", **options, **CONVERGED)(mass * a, x, mass * b, y)
    assert ours.shape == expected.shape == batch
    # GeomLoss ends its annealing ~1e-6 short of the converged value here.
    torch.testing.assert_close(ours, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("reach", [None, 1.0])
@pytest.mark.parametrize("debias", [True, False])
def test_potentials_match_geomloss(reach, debias):
    x, y, a, b = clouds()
    options = dict(blur=0.3, reach=reach, debias=debias, potentials=True)
    f_theirs, g_theirs = theirs(**options)(a, x, b, y)
    f, g = SamplesLoss(**options, **CONVERGED)(a[:, None], x, b[:, None], y)  # (N, 1) weights
    assert f.shape == f_theirs.shape == (1, 40) and g.shape == g_theirs.shape == (1, 30)
    if reach is None:
        # Balanced potentials are defined up to (F + c, G - c): compare without the constant.
        shift = (f - f_theirs).mean()
        f, g = f - shift, g + shift
    # GeomLoss's own convergence bounds the agreement: at scaling 0.9999 its potentials are
    # still ~5e-4 from the converged ones here (its value ~1e-6).
    torch.testing.assert_close(f, f_theirs, rtol=0, atol=1e-3)
    torch.testing.assert_close(g, g_theirs, rtol=0, atol=1e-3)


@pytest.mark.parametrize("debias", [True, False])
def test_balanced_gradients_match_geomloss(debias):
    x, y, a, b = clouds()
    gradients = []
    for loss in (
        theirs(blur=0.3, debias=debias),
        SamplesLoss(blur=0.3, debias=debias, **CONVERGED),
    ):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        loss(a, xs, b, ys).backward()
        gradients.append((xs.grad, ys.grad))
    for ours, expected in zip(gradients[1], gradients[0], strict=True):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


def test_unbalanced_gradient_is_that_of_the_value():
    # GeomLoss's unbalanced gradient comes from autograd through its closing formula, which is
    # not the dual at fixed potentials: it misses its own value's finite differences (here by
    # 4%); ours is the envelope gradient of the value, which matches them.
    x, y, a, b = clouds()
    loss = SamplesLoss(blur=0.3, reach=1.0, **CONVERGED)
    xs = x.clone().requires_grad_()
    loss(a, xs, b, y).backward()
    h = 1e-5
    for i, k in [(3, 1), (17, 0), (29, 2)]:
        step = torch.zeros_like(x)
        step[i, k] = h
        with torch.no_grad():
            slope = (loss(a, x + step, b, y) - loss(a, x - step, b, y)) / (2 * h)
        assert float(xs.grad[i, k]) == pytest.approx(float(slope), rel=1e-5)
    # The same finite difference of GeomLoss's value: the slope is the quantity's, not ours.
    with torch.no_grad():
        theirs_slope = (theirs(blur=0.3, reach=1.0)(a, x + step, b, y)
                        - theirs(blur=0.3, reach=1.0)(a, x - step, b, y)) / (2 * h)  # fmt: skip
    assert float(slope) == pytest.approx(float(theirs_slope), rel=1e-3, abs=1e-6)


def test_uniform_weights_by_default_and_the_plan_on_request():
    x, y, _, _ = clouds(n=20, m=15)
    value, plan = SamplesLoss(blur=0.3, debias=False, return_plan=True, **CONVERGED)(x, y)
    torch.testing.assert_close(value, theirs(blur=0.3, debias=False)(x, y), rtol=2e-6, atol=0)
    assert plan.shape == (20, 15)
    torch.testing.assert_close(plan.sum(1), torch.full((20,), 1 / 20, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(0), torch.full((15,), 1 / 15, dtype=torch.float64))


def test_what_it_does_not_cover_goes_to_geomloss():
    x, y, _, _ = clouds(n=20, m=15)
    for options in (dict(loss="energy"), dict(p=1), dict(loss="gaussian", blur=0.5)):
        expected = geomloss.SamplesLoss(**options)(x, y)
        torch.testing.assert_close(SamplesLoss(**options)(x, y), expected)


def test_without_geomloss_what_it_does_not_cover_is_not_implemented(tmp_path):
    # In a process where geomloss cannot be imported: the drop-in still imports and runs, and
    # what only GeomLoss computes raises NotImplementedError naming it.
    script = tmp_path / "no_geomloss.py"
    script.write_text(
        "import sys\n"
        "sys.modules['geomloss'] = None\n"
        "import importlib.util\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'geomloss' else spec(name)\n"
        "import torch\n"
        "from eotfast.integrations.geomloss import SamplesLoss\n"
        "x, y = torch.randn(8, 2), torch.randn(6, 2)\n"
        "print(float(SamplesLoss()(x, y)) >= 0)\n"
        "try:\n"
        "    SamplesLoss(loss='energy')\n"
        "except NotImplementedError as error:\n"
        "    print('NotImplementedError', error)\n"
    )
    source = script.read_text().replace(
        "import importlib.util\n", "import importlib.util\nspec = importlib.util.find_spec\n"
    )
    script.write_text(source)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[0] == "True"
    assert "NotImplementedError" in out and "loss='energy'" in out and "geomloss" in out


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(blur=0.0), "blur must be a number > 0"),
        (dict(scaling=1.0), r"scaling must be a number in \(0, 1\)"),
        (dict(reach=-1.0), "reach must be None or a number > 0"),
        (dict(backend="keops"), "backend must be one of GeomLoss's"),
    ],
)
def test_bad_settings_get_an_error_naming_them(options, match):
    with pytest.raises(ValueError, match=match):
        SamplesLoss(**options)


def test_bad_calls_get_an_error_naming_them():
    x, y, a, b = clouds(n=5, m=4)
    with pytest.raises(ValueError, match="takes two .x, y., four"):
        SamplesLoss()(x, y, a)
    with pytest.raises(ValueError, match=r"x must be a \(N, D\) or \(B, N, D\) tensor"):
        SamplesLoss()(x[0], y)
