"""layers.dropout, the cheaper CPU dropout: its drop rate, scale and gradient, its seeding,
and attention's dropout path (SDPA's math, checked against SDPA at p = 0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmkit
from lmkit.model.attention import attend_with_dropout
from lmkit.model.layers import Dropout, dropout


def test_dropout_drops_p_of_the_elements_and_scales_the_rest():
    x = torch.ones(1_000_000)
    torch.manual_seed(0)
    y = dropout(x, 0.1)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.002)  # binomial std 0.0003
    kept = y[y != 0]
    assert torch.all(kept == kept[0]) and kept[0].item() == pytest.approx(1 / 0.9, rel=1e-4)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)  # unbiased in expectation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_gradient_is_the_same_mask_and_scale_and_keeps_the_dtype(dtype):
    x = torch.randn(4, 7, 33, dtype=dtype, requires_grad=True)  # 924: not a multiple of 4
    y = dropout(x, 0.3)
    assert y.dtype == dtype and y.shape == x.shape
    y.backward(torch.ones_like(y))
    kept = y != 0
    scale = 65536 / (65536 - round(0.3 * 65536))
    assert torch.equal(x.grad, torch.where(kept, torch.tensor(scale, dtype=dtype), 0))
    assert torch.allclose(y[kept].float(), (x[kept] * scale).float())


def test_dropout_is_reproducible_with_a_seed_and_off_outside_training():
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    a = dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5), a)
    assert not torch.equal(dropout(x, 0.5), a)  # the generator moved on
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    module = Dropout(0.5).eval()
    assert module(x) is x


def _qkv(heads: int, kv_heads: int, t: int = 6, s: int = 6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, heads, t, 8, generator=g), torch.randn(2, kv_heads, s, 8, generator=g),
            torch.randn(2, kv_heads, s, 8, generator=g))


@pytest.mark.parametrize("case", ["none", "causal", "padding", "bias", "gqa", "cross"])
def test_attention_math_equals_sdpa_without_dropout(case):
    heads, kv = (4, 2) if case == "gqa" else (4, 4)
    q, k, v = _qkv(heads, kv, s=9 if case == "cross" else 6)
    mask, causal = None, case in ("causal", "gqa")
    if case in ("padding", "cross"):
        keys = k.shape[2]
        mask = torch.ones(2, 1, 1, keys, dtype=torch.bool)
        mask[1, ..., keys - 2:] = False  # the second row's last two keys are padding
    elif case == "bias":
        mask = torch.randn(1, heads, 6, 6)
    ours = attend_with_dropout(q, k, v, mask, causal, 0.3, 0.0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3,
                                         enable_gqa=kv != heads)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_a_model_in_training_drops_reproducibly_and_not_in_eval():
    torch.manual_seed(0)
    model = lmkit.Model(lmkit.preset("tiny-encoder", dropout=0.1, attention_dropout=0.1))
    ids = torch.randint(5, 200, (2, 10))
    model.eval()
    with torch.no_grad():
        plain = model(ids).logits
        model.train()
        torch.manual_seed(1)
        first = model(ids).logits
        torch.manual_seed(1)
        again = model(ids).logits
    assert torch.equal(first, again) and not torch.allclose(first, plain)
    # the drops are small perturbations of the same function, not a different one
    assert F.cosine_similarity(first.flatten(), plain.flatten(), dim=0) > 0.8
