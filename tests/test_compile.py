"""pair and sinkhorn inside torch.compile(fullgraph=True) on the CPU: no graph break, same
result as eager."""

import pytest
import torch

import eotfast


def ot_paired_step(x0, x1, method, options):
    """A training-step shape: pair, gather the partners, compute a loss-like reduction."""
    j = eotfast.pair(x0, x1, method=method, **options)  # [n]: images are samples first
    x1 = x1[j]  # [n, c, h, w], partners of x0
    return j, (x1 - x0).square().mean()


@pytest.mark.slow
# argmax for Sinkhorn: a sampled draw uses torch's RNG, which compiled code draws differently;
# exact takes no sampling option.
@pytest.mark.parametrize("method,options", [("sinkhorn", {"sampling": "argmax"}), ("exact", {})])
def test_compiled_step_with_pair_matches_eager(method, options):
    torch._dynamo.reset()
    x0, x1 = torch.randn(32, 3, 8, 8), torch.randn(32, 3, 8, 8) + 0.5
    compiled = torch.compile(ot_paired_step, fullgraph=True)  # raises on any graph break
    j_compiled, loss_compiled = compiled(x0, x1, method, options)
    j_eager, loss_eager = ot_paired_step(x0, x1, method, options)
    assert torch.equal(j_compiled, j_eager)
    torch.testing.assert_close(loss_compiled, loss_eager)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,sampling", [("auto", None), ("sinkhorn", "sample"), ("sinkhorn", "permutation")]
)
def test_compiled_pair_has_no_graph_break(method, sampling):
    # ("auto", None) is the auction on the CPU; ("sinkhorn", "permutation") is what "auto"
    # runs on a GPU: Sinkhorn, then the warm-started auction.
    torch._dynamo.reset()
    x0, x1 = torch.randn(16, 48), torch.randn(16, 48)

    def call(a, b):
        return eotfast.pair(a, b, method, sampling=sampling)

    explanation = torch._dynamo.explain(call)(x0, x1)
    assert explanation.graph_break_count == 0
    j = torch.compile(call, fullgraph=True)(x0, x1)
    assert j.shape == (16,) and ((0 <= j) & (j < 16)).all()
    if sampling != "sample":  # deterministic: the compiled pairs are the eager ones
        assert torch.equal(j, call(x0, x1))


@pytest.mark.slow
@pytest.mark.parametrize("relative_reg", [True, False])
def test_compiled_pair_refuses_an_epsilon_out_of_range_as_eager_does(relative_reg):
    # The public functions skip their checks of values while tracing; the ops check them:
    # compiled, reg=1e-45 drew pairs from a garbage plan (f = -inf, partners all column 0),
    # where eager raised a ValueError naming reg.
    torch._dynamo.reset()
    x0, x1 = torch.randn(16, 4), torch.randn(16, 4)
    with pytest.raises(ValueError, match="reg"):
        eotfast.pair(x0, x1, "sinkhorn", reg=1e-45, relative_reg=relative_reg)
    compiled = torch.compile(ot_paired_step, fullgraph=True)
    options = {"reg": 1e-45, "relative_reg": relative_reg}
    with pytest.raises(ValueError, match="epsilon of problem 0 is .* outside the positive normal"):
        compiled(x0, x1, "sinkhorn", options)


@pytest.mark.slow
@pytest.mark.parametrize("call", ["cost_matrix", "pair"])
@pytest.mark.parametrize("culprit", ["x", "y"])
def test_compiled_call_refuses_nonfinite_points_naming_them(call, culprit):
    # Compiled, cost_matrix returned a NaN cost where eager raised naming x: the public
    # functions skip their reads of values while tracing. The graph now carries them as
    # run-time assertions (RuntimeError with eager's words).
    torch._dynamo.reset()
    points = {"x": torch.randn(6, 3), "y": torch.randn(5, 3)}
    points[culprit][2, 1] = float("nan")
    function = getattr(eotfast, call)
    with pytest.raises(ValueError, match=f"{culprit} contains NaN"):
        function(points["x"], points["y"])
    compiled = torch.compile(function, fullgraph=True)
    with pytest.raises(RuntimeError, match=f"{culprit} contains NaN or inf"):
        compiled(points["x"], points["y"])


@pytest.mark.slow
def test_compiled_cost_matrix_refuses_distances_that_overflow():
    torch._dynamo.reset()
    x, y = torch.full((2, 3), 3e19), torch.full((2, 3), -3e19)  # squared distances ~1e40
    with pytest.raises(ValueError, match="squared distances between x and y overflow"):
        eotfast.cost_matrix(x, y)
    compiled = torch.compile(eotfast.cost_matrix, fullgraph=True)
    with pytest.raises(RuntimeError, match="squared distances between x and y overflow"):
        compiled(x, y)


def test_generator_inside_torch_compile_is_refused_naming_it():
    # dynamo cannot trace a torch.Generator; its own error named neither pair nor generator.
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)

    def call(x, y):
        return eotfast.pair(x, y, "sinkhorn", generator=generator)

    x, y = torch.randn(4, 2), torch.randn(4, 2)
    with pytest.raises(torch._dynamo.exc.Unsupported) as info:
        torch.compile(call, fullgraph=True, backend="aot_eager")(x, y)
    assert "generator must be None inside torch.compile" in str(info.value.__cause__)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
        eotfast.pair(x, y, "sinkhorn", generator=0)
