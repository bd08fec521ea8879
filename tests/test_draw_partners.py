"""The row draw of pair(): one partner per row of a Sinkhorn plan, on every backend, against
closed forms (a plan row is softmax((g - C_i) / epsilon))."""

import torch
from oracles import assert_partners_are_row_maxima

import eotfast
from eotfast.ops.registry import backend_ops


def test_sampled_frequencies_match_the_plan_rows(backend, device):
    # 4000 identical rows: each draw is independent (Philox counter per row in the kernel,
    # fresh uniforms in torch), so the frequencies estimate the row's distribution.
    rows, m = 4000, 6
    generator = torch.Generator().manual_seed(4)
    row_cost = torch.rand(m, generator=generator)
    cost = row_cost.expand(1, rows, m).contiguous()
    g = torch.rand(1, m, generator=generator) * 0.5
    epsilon = torch.tensor([0.3])
    expected = torch.softmax((g[0] - row_cost) / epsilon, dim=0).double()
    drawn = backend_ops(backend).draw_partners(
        cost.to(device), g.to(device), epsilon.to(device), "sample",
        torch.Generator(device).manual_seed(5),
    ).cpu()  # fmt: skip
    frequencies = torch.bincount(drawn.flatten(), minlength=m).double() / rows
    total_variation = 0.5 * (frequencies - expected).abs().sum()
    # Expected TV of 4000 draws over 6 outcomes is ~0.015; 0.04 leaves a wide margin yet
    # fails for any bias of the size of one outcome's probability.
    assert total_variation < 0.04, (frequencies, expected)


def test_argmax_pairs_are_row_maxima_of_the_plan(backend, device):
    x, y = torch.randn(2, 20, 50), torch.randn(2, 23, 50)
    partners = eotfast.pair(
        x.to(device), y.to(device), backend=backend, sampling="argmax", batch_dims=1
    )
    assert partners.shape == (2, 20) and partners.dtype == torch.int64
    assert_partners_are_row_maxima(partners.cpu(), x, y)


def test_a_seeded_generator_fixes_the_draws(backend, device):
    x, y = torch.randn(2, 20, 50).to(device), torch.randn(2, 23, 50).to(device)

    def draw(seed):
        generator = torch.Generator(device).manual_seed(seed)
        return eotfast.pair(x, y, "sinkhorn", backend=backend, generator=generator, batch_dims=1)

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))
