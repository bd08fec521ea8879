"""eotfast.integrations.torchcfm: the drop-in for torchcfm's OTPlanSampler, against POT, scipy
and torchcfm itself (the tests that need torchcfm skip without it)."""

import subprocess
import sys
import warnings

import numpy as np
import ot
import pytest
import scipy.optimize
import torch
from oracles import optimum, total

from eotfast.integrations.torchcfm import OTPlanSampler, patch_torchcfm, use_eotfast


def torchcfm_sampler(*args, **kwargs):
    """torchcfm's own OTPlanSampler (the test skips without torchcfm)."""
    module = pytest.importorskip("torchcfm.optimal_transport")
    return module.OTPlanSampler(*args, **kwargs)


def pot_emd_plan(x0, x1):
    """The plan torchcfm's own test_get_map expects: POT's emd on torch.cdist(...) ** 2."""
    cost = torch.cdist(x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)) ** 2
    return ot.emd(ot.unif(x0.shape[0]), ot.unif(x1.shape[0]), cost.numpy())


def flat_cost64(x0, x1):
    """POT's squared Euclidean cost of the flattened samples, in float64 (the oracle's)."""
    return ot.dist(x0.reshape(x0.shape[0], -1).double().numpy(),
                   x1.reshape(x1.shape[0], -1).double().numpy())  # fmt: skip


def image_like(n, shape=(3, 32, 32), seed=0):
    """Two batches of image-like samples in [-1, 1] around shared cluster centres (costs in
    the thousands at 3 x 32 x 32), as bench/_bench_utils.image_batches."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(4, *shape, generator=gen) * 2 - 1

    def batch():
        labels = torch.randint(4, (n,), generator=gen)
        return (centres[labels] + 0.3 * torch.randn(n, *shape, generator=gen)).clamp(-1, 1)

    return batch(), batch()


# ----------------------------------------------------------------------------- exact plans
@pytest.mark.parametrize(
    "n, shape, seeds",
    [(128, (2, 2, 2), 20), (100, (5,), 10), (7, (3,), 10), (64, (3, 8, 8), 5), (256, (3, 8, 8), 2)],
    ids=["torchcfm-test", "n100", "n7", "image-n64", "image-n256"],
)
def test_exact_plan_equals_pot_emd_plan(n, shape, seeds):
    sampler = OTPlanSampler("exact")
    for seed in range(seeds):
        torch.manual_seed(seed)
        x0, x1 = torch.randn(n, *shape), torch.randn(n, *shape)
        plan = sampler.get_map(x0, x1)
        assert plan.dtype == np.float64 and plan.shape == (n, n)
        assert np.array_equal(plan, pot_emd_plan(x0, x1)), seed


@pytest.mark.parametrize("n, m", [(48, 64), (64, 48)])
def test_exact_plan_with_n_not_m_is_pots(n, m):
    torch.manual_seed(0)
    x0, x1 = torch.randn(n, 3, 2), torch.randn(m, 3, 2)
    plan = OTPlanSampler("exact").get_map(x0, x1)
    expected = pot_emd_plan(x0, x1)
    assert np.allclose(plan, expected, rtol=0, atol=1e-15)
    assert np.allclose(plan.sum(1), 1 / n) and np.allclose(plan.sum(0), 1 / m)


def test_normalized_exact_plan_is_pots():
    torch.manual_seed(1)
    x0, x1 = torch.randn(64, 4), torch.randn(64, 4)
    cost = torch.cdist(x0, x1) ** 2
    expected = ot.emd(ot.unif(64), ot.unif(64), (cost / cost.max()).numpy())
    assert np.array_equal(OTPlanSampler("exact", normalize_cost=True).get_map(x0, x1), expected)


# ----------------------------------------------------------------------------- draws
def _plans():
    rng = np.random.default_rng(0)
    permutation = np.zeros((100, 100))
    permutation[np.arange(100), rng.permutation(100)] = 1 / 100
    sparse = rng.random((37, 53)) * (rng.random((37, 53)) < 0.2) * 3.7  # total mass != 1
    dense = rng.random((64, 64))
    return {"permutation": permutation, "sparse": sparse, "dense": dense,
            "float32": dense.astype(np.float32)}  # fmt: skip


@pytest.mark.parametrize("replace", [True, False])
@pytest.mark.parametrize("kind", ["permutation", "sparse", "dense", "float32"])
def test_sample_map_draws_torchcfms_indices(kind, replace):
    reference = torchcfm_sampler("exact")
    pi = _plans()[kind]
    size = min(pi.shape) if not replace else 3 * pi.shape[0]
    for seed in range(5):
        np.random.seed(seed)
        ours = OTPlanSampler("exact").sample_map(pi, size, replace=replace)
        ours_next = np.random.random_sample()  # the generator's state after the draw
        np.random.seed(seed)
        theirs = reference.sample_map(pi, size, replace=replace)
        for a, b in zip(ours, theirs, strict=True):
            assert np.array_equal(a, b) and a.dtype == b.dtype
        assert ours_next == np.random.random_sample()


def test_sample_map_rejects_what_numpy_rejects():
    pi = np.array([[0.5, -0.1], [0.3, 0.3]])
    with pytest.raises(ValueError, match="non-negative"):
        OTPlanSampler("exact").sample_map(pi, 4)


@pytest.mark.parametrize("method, reg", [("exact", 0.05), ("sinkhorn", 0.5)])
def test_sample_plan_is_get_map_then_sample_map(method, reg):
    sampler = OTPlanSampler(method, reg=reg)
    torch.manual_seed(1980)
    x0, x1 = torch.randn(128, 2, 2, 2), torch.randn(128, 2, 2, 2)
    np.random.seed(1980)
    i, j = sampler.sample_map(sampler.get_map(x0, x1), 128)
    np.random.seed(1980)
    new_x0, new_x1 = sampler.sample_plan(x0, x1)
    assert torch.equal(new_x0, x0[i]) and torch.equal(new_x1, x1[j])
    np.random.seed(1980)
    rows, columns = sampler.sample_plan(x0, x1, return_indices=True)
    assert torch.equal(rows, torch.from_numpy(i)) and torch.equal(columns, torch.from_numpy(j))


def test_exact_pairs_and_labels_are_torchcfms():
    reference = torchcfm_sampler("exact")
    torch.manual_seed(0)
    x0, x1 = torch.randn(100, 3, 4), torch.randn(100, 3, 4)
    y0, y1 = torch.randint(10, (100, 1)), torch.randint(10, (100,))
    for seed in range(3):
        np.random.seed(seed)
        ours = OTPlanSampler("exact").sample_plan_with_labels(x0, x1, y0, y1)
        np.random.seed(seed)
        theirs = reference.sample_plan_with_labels(x0, x1, y0, y1)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        np.random.seed(seed)
        ours = OTPlanSampler("exact").sample_plan_with_labels(x0, x1, None, y1)
        assert ours[2] is None and torch.equal(ours[3], theirs[3])


def test_trajectory_is_torchcfms():
    reference = torchcfm_sampler("exact")
    torch.manual_seed(0)
    X = torch.randn(40, 4, 2, 3)
    np.random.seed(7)
    ours = OTPlanSampler("exact").sample_trajectory(X)
    np.random.seed(7)
    theirs = reference.sample_trajectory(X)
    assert isinstance(ours, np.ndarray) and ours.shape == (40, 4, 2, 3)
    assert np.array_equal(ours, theirs)


# ----------------------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, m, reg", [(48, 48, 1.0), (40, 56, 0.5)])
def test_sinkhorn_plan_is_pots_log_domain_plan(n, m, reg, dtype):
    torch.manual_seed(0)
    x0, x1 = torch.randn(n, 5, dtype=dtype), torch.randn(m, 5, dtype=dtype)
    cost = flat_cost64(x0, x1)
    expected = ot.bregman.sinkhorn_log(ot.unif(n), ot.unif(m), cost, reg, stopThr=1e-12,
                                       numItermax=100_000)  # fmt: skip
    plan = OTPlanSampler("sinkhorn", reg=reg).get_map(x0, x1)
    assert plan.dtype == np.float64
    rtol = 1e-6 if dtype == torch.float64 else 1e-4  # a float32 cost, rounded, over reg
    assert np.allclose(plan, expected, rtol=rtol, atol=1e-9)
    # where POT's kernel solver does not underflow, it is the same plan as torchcfm's
    assert np.allclose(plan, ot.sinkhorn(ot.unif(n), ot.unif(m), cost, reg), rtol=rtol, atol=1e-9)


def test_sinkhorn_on_image_costs_is_not_the_uniform_plan():
    # Costs 400-2400 at d = 3072: POT's exp(-C / 2) underflows to 0, ot.sinkhorn's plan has
    # mass 0, and torchcfm falls back to the uniform plan (random pairs).
    x0, x1 = image_like(48)
    cost = flat_cost64(x0, x1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        collapsed = ot.sinkhorn(ot.unif(48), ot.unif(48), cost.astype(np.float32), 2.0)
    assert not abs(collapsed.sum()) >= 1e-8  # 0 or NaN: what torchcfm reverts from
    plan = OTPlanSampler("sinkhorn", reg=2.0, max_iter=10_000).get_map(x0, x1)
    assert np.abs(plan.sum(1) - 1 / 48).max() < 1e-9 and np.abs(plan.sum(0) - 1 / 48).max() < 1e-9
    uniform, best = cost.mean(), optimum(cost) / 48
    assert ((plan * cost).sum() - best) < 0.01 * (uniform - best)  # near the OT plan
    assert plan.max() > 10 / 48**2  # far from uniform
    try:
        theirs = torchcfm_sampler("sinkhorn", reg=2.0)
    except pytest.skip.Exception:
        return
    with pytest.warns(UserWarning, match="reverting to uniform"):
        assert np.allclose(theirs.get_map(x0, x1), 1 / 48**2)


def test_sinkhorn_warns_when_it_stops_above_its_tolerance():
    torch.manual_seed(0)
    x0, x1 = torch.randn(32, 4), torch.randn(32, 4)
    with pytest.warns(UserWarning, match="above tol") as caught:
        plan = OTPlanSampler("sinkhorn", reg=0.01, max_iter=50).get_map(x0, x1)
    assert len(caught) == 1 and caught[0].filename == __file__  # the caller's line
    assert np.isfinite(plan).all() and plan.max() > 2 / 32**2  # not converged, still used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OTPlanSampler("sinkhorn", reg=0.01, max_iter=50, warn=False).get_map(x0, x1)
        OTPlanSampler("sinkhorn", reg=1.0).get_map(x0, x1)


def test_unusable_plan_reverts_to_uniform():
    # POT's unbalanced kernel exp(-C / 1e-3) underflows: a plan of mass 0 (torchcfm's case).
    torch.manual_seed(0)
    x0, x1 = torch.randn(16, 8) + 10, torch.randn(16, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = OTPlanSampler("unbalanced", reg=1e-3).get_map(x0, x1)
    assert np.allclose(plan, 1 / 16**2)
    assert any("reverting to the uniform plan" in str(w.message) for w in caught)
    assert all(w.filename == __file__ for w in caught if "eotfast" in str(w.message))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = OTPlanSampler("unbalanced", reg=1e-3, warn=False).get_map(x0, x1)
    assert np.allclose(plan, 1 / 16**2)
    assert not any("eotfast" in str(w.message) for w in caught)


@pytest.mark.parametrize("method", ["unbalanced", "partial"])
def test_unbalanced_and_partial_are_pots(method):
    torch.manual_seed(0)
    x0, x1 = torch.randn(32, 2, 3), torch.randn(40, 2, 3)
    cost = ot.dist(x0.reshape(32, -1).numpy(), x1.reshape(40, -1).numpy())  # float32
    a, b = ot.unif(32), ot.unif(40)
    if method == "unbalanced":
        expected = ot.unbalanced.sinkhorn_knopp_unbalanced(a, b, cost, reg=1.0, reg_m=2.0)
    else:
        expected = ot.partial.entropic_partial_wasserstein(a, b, cost, reg=1.0)
    plan = OTPlanSampler(method, reg=1.0, reg_m=2.0).get_map(x0, x1)
    assert np.allclose(plan, expected, rtol=1e-4, atol=1e-12)
    theirs = torchcfm_sampler(method, reg=1.0, reg_m=2.0).get_map(x0, x1)
    assert np.allclose(plan, theirs, rtol=1e-4, atol=1e-12)


# ----------------------------------------------------------------------------- scipy order
def test_sample_plan_with_scipy_keeps_x0_and_reorders_x1_optimally():
    torch.manual_seed(0)
    x0, x1 = torch.randn(50, 3, 4, 4), torch.randn(70, 3, 4, 4)
    _, columns = scipy.optimize.linear_sum_assignment(flat_cost64(x0, x1))
    for sampler in (OTPlanSampler("exact"), OTPlanSampler("sinkhorn", on_device=True)):
        new_x0, new_x1 = sampler.sample_plan_with_scipy(x0, x1)
        assert new_x0 is x0 and new_x1.shape == (50, 3, 4, 4)
        assert torch.equal(new_x1, x1[columns])
    with pytest.raises(ValueError, match="n <= m"):
        OTPlanSampler("exact").sample_plan_with_scipy(x1, x0)


# ----------------------------------------------------------------------------- on the device
def test_on_device_exact_gives_distinct_optimal_targets_without_numpy():
    torch.manual_seed(0)
    x0, x1 = torch.randn(96, 3, 8, 8), torch.randn(96, 3, 8, 8)
    y1 = torch.arange(96)
    sampler = OTPlanSampler("exact", on_device=True)
    state = np.random.get_state()
    rows, columns = sampler.sample_plan(x0, x1, return_indices=True)
    new_x0, new_x1 = sampler.sample_plan(x0, x1)
    _, _, _, labels = sampler.sample_plan_with_labels(x0, x1, None, y1)
    after = np.random.get_state()
    # numpy's global generator untouched
    assert all(np.array_equal(a, b) for a, b in zip(state[1:], after[1:], strict=True))
    assert torch.equal(rows, torch.arange(96)) and new_x0 is x0
    assert sorted(columns.tolist()) == list(range(96))
    assert torch.equal(new_x1, x1[columns]) and torch.equal(labels, columns)
    cost = flat_cost64(x0, x1)
    assert total(cost, columns) == pytest.approx(optimum(cost), rel=1e-6)


def test_on_device_exact_with_more_targets():
    torch.manual_seed(0)
    x0, x1 = torch.randn(40, 6), torch.randn(64, 6)
    _, columns = OTPlanSampler("exact", on_device=True).sample_plan(x0, x1, return_indices=True)
    cost = flat_cost64(x0, x1)
    assert columns.unique().numel() == 40
    assert total(cost, columns) == pytest.approx(optimum(cost), rel=1e-6)
    with pytest.raises(ValueError, match="n <= m"):
        OTPlanSampler("exact", on_device=True).sample_plan(x1, x0)


def test_on_device_sinkhorn_draws_are_reproducible_with_a_generator():
    torch.manual_seed(0)
    x0, x1 = torch.randn(64, 4), torch.randn(80, 4)

    def draw(seed, **options):
        generator = torch.Generator().manual_seed(seed)
        sampler = OTPlanSampler("sinkhorn", reg=2.0, on_device=True, generator=generator,
                                **options)  # fmt: skip
        return sampler.sample_plan(x0, x1, return_indices=True)[1]

    torch_state = torch.get_rng_state()
    first, again, other = draw(0), draw(0), draw(1)
    assert torch.equal(torch_state, torch.get_rng_state())  # only the generator was used
    assert torch.equal(first, again) and not torch.equal(first, other)
    # the draws follow the plan: mostly onto targets the plan favours
    plan = OTPlanSampler("sinkhorn", reg=2.0).get_map(x0, x1)
    assert plan[np.arange(64), first.numpy()].mean() > 3 * plan.mean()
    distinct = draw(0, sampling="permutation")
    assert distinct.unique().numel() == 64
    normalized = draw(0, normalize_cost=True)  # reg relative to max(C): a flatter plan
    assert normalized.shape == (64,)


def test_on_device_trajectory_chains_exact_partners():
    torch.manual_seed(0)
    X = torch.randn(30, 3, 5)
    sampler = OTPlanSampler("exact", on_device=True)
    paths = sampler.sample_trajectory(X)
    assert isinstance(paths, torch.Tensor) and paths.shape == (30, 3, 5)
    first = sampler.sample_plan(X[:, 0], X[:, 1], return_indices=True)[1]
    second = sampler.sample_plan(X[:, 1], X[:, 2], return_indices=True)[1]
    assert torch.equal(paths[:, 0], X[:, 0]) and torch.equal(paths[:, 1], X[:, 1][first])
    assert torch.equal(paths[:, 2], X[:, 2][second[first]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_device_mode_never_syncs_on_cuda():
    gen = torch.Generator("cuda").manual_seed(0)
    x0, x1 = (torch.randn(256, 3, 8, 8, device="cuda", generator=gen) for _ in range(2))
    samplers = [
        OTPlanSampler("exact", on_device=True),
        OTPlanSampler("sinkhorn", reg=5.0, on_device=True, generator=gen),
        OTPlanSampler("sinkhorn", reg=5.0, on_device=True, sampling="permutation"),
    ]
    for sampler in samplers:  # compile the kernels first
        sampler.sample_plan(x0, x1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pairs = [sampler.sample_plan(x0, x1, return_indices=True)[1] for sampler in samplers]
        samplers[0].sample_plan(x0, x1)
        samplers[0].sample_plan_with_labels(x0, x1, None, torch.arange(256, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cost = flat_cost64(x0.cpu(), x1.cpu())
    exact = pairs[0].cpu().numpy()
    assert len(set(exact.tolist())) == 256 and len(set(pairs[2].tolist())) == 256
    assert total(cost, exact) == pytest.approx(optimum(cost), rel=1e-5)


# ----------------------------------------------------------------------------- torchcfm
@pytest.mark.parametrize("kind", ["exact", "sb"])
def test_flow_matchers_with_use_eotfast_pair_through_the_drop_in(kind):
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    sigma = 0.5
    if kind == "exact":
        fm = cfm.ExactOptimalTransportConditionalFlowMatcher(sigma=sigma)
    else:
        fm = cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=sigma, ot_method="sinkhorn")
    assert use_eotfast(fm) is fm and isinstance(fm.ot_sampler, OTPlanSampler)
    assert fm.ot_sampler.method == ("exact" if kind == "exact" else "sinkhorn")
    assert kind == "exact" or fm.ot_sampler.reg == 2 * sigma**2
    torch.manual_seed(0)
    x0, x1 = torch.randn(64, 2, 3), torch.randn(64, 2, 3) + 1
    torch.manual_seed(1)
    np.random.seed(1)
    t, xt, ut, eps = fm.sample_location_and_conditional_flow(x0, x1, return_noise=True)
    np.random.seed(1)
    rows, columns = fm.ot_sampler.sample_plan(x0, x1, return_indices=True)
    if kind == "exact":  # the pairs torchcfm's own sampler draws
        np.random.seed(1)
        expected = torchcfm_sampler("exact").sample_plan(x0, x1)
        assert torch.equal(x0[rows], expected[0]) and torch.equal(x1[columns], expected[1])
    a, b, s = x0[rows], x1[columns], t.reshape(-1, 1, 1)
    mu = s * b + (1 - s) * a
    if kind == "exact":
        expected_xt, expected_ut = mu + sigma * eps, b - a
    else:
        expected_xt = mu + sigma * torch.sqrt(s * (1 - s)) * eps
        expected_ut = (1 - 2 * s) / (2 * s * (1 - s) + 1e-8) * (expected_xt - mu) + b - a
    assert torch.allclose(xt, expected_xt, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ut, expected_ut, rtol=1e-5, atol=1e-5)
    # the guided (labelled) path goes through the drop-in too
    y0, y1 = torch.arange(64), torch.arange(64) + 100
    np.random.seed(2)
    _, _, _, labels0, labels1 = fm.guided_sample_location_and_conditional_flow(x0, x1, y0, y1)
    np.random.seed(2)
    rows, columns = fm.ot_sampler.sample_plan(x0, x1, return_indices=True)
    assert torch.equal(labels0, y0[rows]) and torch.equal(labels1, y1[columns])


def test_use_eotfast_reads_torchcfms_settings_and_takes_options():
    module = pytest.importorskip("torchcfm.optimal_transport")

    class Matcher:
        pass

    matcher = Matcher()
    for method in ("exact", "sinkhorn", "unbalanced", "partial"):
        matcher.ot_sampler = module.OTPlanSampler(method, reg=0.3, reg_m=2.5,
                                                  normalize_cost=True, warn=False)  # fmt: skip
        use_eotfast(matcher)
        settings = matcher.ot_sampler.settings()
        assert settings["method"] == method and settings["reg"] == 0.3
        assert settings["reg_m"] == 2.5 and settings["normalize_cost"] and not settings["warn"]
    use_eotfast(matcher, method="sinkhorn", on_device=True)  # ours again, with options
    assert matcher.ot_sampler.on_device and matcher.ot_sampler.reg_m == 2.5
    with pytest.raises(TypeError, match="flow_matcher.*ot_sampler"):
        use_eotfast(Matcher())


def test_use_eotfast_refuses_a_flow_matcher_without_an_ot_sampler():
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    with pytest.raises(TypeError, match="use_eotfast\\(flow_matcher\\).*ConditionalFlowMatcher"):
        use_eotfast(cfm.ConditionalFlowMatcher(sigma=0.1))


def test_patch_torchcfm_replaces_both_module_attributes_and_restores_them():
    ot_module = pytest.importorskip("torchcfm.optimal_transport")
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    original = ot_module.OTPlanSampler
    with patch_torchcfm():
        assert ot_module.OTPlanSampler is OTPlanSampler
        assert cfm.OTPlanSampler is OTPlanSampler
        fm = cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=0.3, ot_method="exact")
        assert isinstance(fm.ot_sampler, OTPlanSampler) and fm.ot_sampler.method == "exact"
        patch_torchcfm().undo()  # patching twice changes nothing
        assert cfm.OTPlanSampler is OTPlanSampler
    assert ot_module.OTPlanSampler is original and cfm.OTPlanSampler is original


def test_module_imports_and_works_without_torchcfm():
    code = (
        "import sys\n"
        "sys.modules['torchcfm'] = None  # as if torchcfm were not installed\n"
        "import torch\n"
        "from eotfast.integrations.torchcfm import OTPlanSampler, patch_torchcfm\n"
        "x0, x1 = torch.randn(16, 3), torch.randn(16, 3)\n"
        "assert OTPlanSampler('exact').sample_plan(x0, x1)[0].shape == (16, 3)\n"
        "try:\n"
        "    patch_torchcfm()\n"
        "except ImportError as error:\n"
        "    print('ImportError:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ImportError: patch_torchcfm needs torchcfm" in result.stdout


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "noname"}, "Unknown method"),
        ({"method": "unbalanced", "on_device": True}, "on_device=True has no solver"),
        ({"method": "partial", "on_device": True}, "on_device=True has no solver"),
        ({"method": "sinkhorn", "sampling": "sample"}, "sampling applies with on_device"),
        ({"method": "exact", "on_device": True, "sampling": "permutation"}, "sampling applies"),
        ({"method": "sinkhorn", "on_device": True, "sampling": "best"}, "sampling must be"),
        ({"method": "sinkhorn", "generator": torch.Generator()}, "generator applies"),
        ({"method": "sinkhorn", "reg": 0.0}, "reg must be"),
        ({"method": "exact", "backend": "numpy"}, "backend must be"),
    ],
)
def test_bad_settings_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OTPlanSampler(**kwargs)
