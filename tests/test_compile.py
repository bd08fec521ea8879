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
