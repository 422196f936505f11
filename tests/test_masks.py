"""Attention masks: causality, padding and packed segments, for every family."""

import pytest
import torch
from conftest import VARIANTS, family_of, variant

DECODING = [k for k in VARIANTS if family_of(k) != "encoder"]


def run(model, ids, mask=None, seg=None, dec=None, dec_mask=None, dec_seg=None):
    if model.config.family == "encoder-decoder":
        return model(ids, attention_mask=mask, segment_ids=seg, decoder_input_ids=dec,
                     decoder_attention_mask=dec_mask, decoder_segment_ids=dec_seg).logits
    return model(ids, attention_mask=mask, segment_ids=seg).logits


@pytest.mark.parametrize("key", DECODING)
def test_no_causal_leak(key):
    model = variant(key)
    ids = torch.randint(3, 500, (2, 12))
    src = torch.randint(3, 500, (2, 9))
    for t in (0, 5, 10):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(3, 500, changed[:, t + 1:].shape)
        if model.config.family == "decoder":
            a, b = run(model, ids), run(model, changed)
        else:
            a, b = run(model, src, dec=ids), run(model, src, dec=changed)
        torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])  # the future does matter there


@pytest.mark.parametrize("key", list(VARIANTS))
def test_padding_invariance(key):
    model = variant(key)
    fam = model.config.family
    lengths = [7, 11, 4]
    seqs = [torch.randint(3, 500, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    left = fam == "decoder"
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    if fam == "encoder-decoder":
        tgts = [torch.randint(3, 500, (n,)) for n in (5, 3, 6)]
        dec = torch.zeros(3, 6, dtype=torch.long)
        dec_mask = torch.zeros_like(dec)
        for i, t in enumerate(tgts):
            dec[i, :len(t)], dec_mask[i, :len(t)] = t, 1
        batch = run(model, ids, mask, dec=dec, dec_mask=dec_mask)
        for i, (s, t) in enumerate(zip(seqs, tgts)):
            alone = run(model, s[None], dec=t[None])
            torch.testing.assert_close(batch[i, :len(t)], alone[0], atol=1e-5, rtol=0)
        return
    batch = run(model, ids, mask)
    for i, s in enumerate(seqs):
        alone = run(model, s[None])[0]
        got = batch[i, width - len(s):] if left else batch[i, :len(s)]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", list(VARIANTS))
def test_packed_segments(key):
    model = variant(key)
    a, b = torch.randint(3, 500, (6,)), torch.randint(3, 500, (9,))
    row = torch.cat([a, b])[None]
    seg = torch.tensor([[1] * 6 + [2] * 9])
    if model.config.family == "encoder-decoder":
        ta, tb = torch.randint(3, 500, (4,)), torch.randint(3, 500, (5,))
        dec = torch.cat([ta, tb])[None]
        dec_seg = torch.tensor([[1] * 4 + [2] * 5])
        packed = run(model, row, seg=seg, dec=dec, dec_seg=dec_seg)[0]
        torch.testing.assert_close(packed[:4], run(model, a[None], dec=ta[None])[0], atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(packed[4:], run(model, b[None], dec=tb[None])[0], atol=1e-5,
                                   rtol=0)
        return
    packed = run(model, row, seg=seg)[0]
    torch.testing.assert_close(packed[:6], run(model, a[None])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[6:], run(model, b[None])[0], atol=1e-5, rtol=0)


def test_packed_with_padding_tail():
    model = variant("decoder-rotary-gqa")
    a, b = torch.randint(3, 500, (5,)), torch.randint(3, 500, (4,))
    row = torch.cat([a, b, torch.zeros(3, dtype=torch.long)])[None]
    seg = torch.tensor([[1] * 5 + [2] * 4 + [0] * 3])
    out = run(model, row, seg=seg)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[5:9], run(model, b[None])[0], atol=1e-5, rtol=0)
