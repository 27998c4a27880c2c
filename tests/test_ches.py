"""CHES math on hand-computed tensors."""

import pytest
import torch

from ches_filter.ches import ches_from_sums, gather_sums, inner_product, ln_ches_from_sums


def test_ches_hand_computed():
    s_plus = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    s_minus = torch.tensor([[2.0, 1.0], [-1.0, 4.0]])
    # <S+,S-> - ||S+||^2: (2+2) - (1+4) = -1 ; (-3+0) - 9 = -12
    assert ches_from_sums(s_plus, s_minus).tolist() == [-1.0, -12.0]


def test_ln_ches_hand_computed():
    s_plus = torch.tensor([[2.0, 4.0]])
    s_minus = torch.tensor([[3.0, 3.0]])
    # <S+,S->/(n+ n-) - ||S+||^2/n+^2 with n+=2, n-=3: 18/6 - 20/4 = 3 - 5 = -2
    out = ln_ches_from_sums(s_plus, s_minus, torch.tensor([2]), torch.tensor([3]))
    assert out.dtype == torch.float64
    assert out.tolist() == pytest.approx([-2.0], abs=1e-12)


def test_identical_responses_score_exactly_zero():
    s = torch.randn(5, 64, dtype=torch.float32) * 1e3
    assert torch.all(ches_from_sums(s, s) == 0)
    assert torch.all(ln_ches_from_sums(s, s, torch.full((5,), 7), torch.full((5,), 7)) == 0)


def test_large_norms_stay_finite_in_float64():
    # 2,000 tokens of 4096-dim bf16 states of magnitude ~1e4 would overflow
    # float16 and lose everything in float32 products; float64 sums do not.
    s = torch.full((1, 4096), 2000 * 1e4, dtype=torch.float64)
    value = ches_from_sums(s, s * 0.5)
    assert torch.isfinite(value).all()
    assert value.item() == pytest.approx(-0.5 * 4096 * (2e7) ** 2, rel=1e-12)


def test_gather_sums_shared_position_feeds_two_segments():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    # flat rows: 0:[0,1] 1:[2,3] 2:[4,5] 3:[6,7] 4:[8,9] 5:[10,11]
    flat = torch.tensor([1, 2, 1, 5, 3])
    seg = torch.tensor([0, 0, 1, 1, 2])
    out = gather_sums(hidden, flat, seg, 4)
    assert out.dtype == torch.float64
    assert out.tolist() == [[6.0, 8.0], [12.0, 14.0], [6.0, 7.0], [0.0, 0.0]]


def test_gather_sums_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes"):
        gather_sums(torch.zeros(2, 3), torch.tensor([0]), torch.tensor([0]), 1)


def test_inner_product_rowwise():
    a = torch.tensor([[1.0, 2.0], [0.5, 0.5]])
    b = torch.tensor([[3.0, 4.0], [2.0, 2.0]])
    assert inner_product(a, b).tolist() == [11.0, 2.0]
