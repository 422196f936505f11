"""The training loss without logits (model/loss.py) and activation checkpointing: both change
what is kept in memory, never the numbers (loss and every gradient equal the plain way)."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, family_of, variant

import lmkit
import lmkit.model.loss as loss_module
from lmkit.config import IGNORE_INDEX
from lmkit.train import TrainConfig, train

VOCAB_HEADS = ["decoder-rotary-gqa", "decoder-learned-gpt2", "encoder-learned",
               "seq2seq-relative-t5", "seq2seq-learned-bart"]  # lm, mlm, output_scale, bias


def _batch(key: str, model: lmkit.Model) -> dict[str, torch.Tensor]:
    """A padded batch with labels for the model's head (some positions ignored)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[2, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    family = family_of(key)
    if family == "decoder":
        batch["labels"] = ids.masked_fill(mask == 0, IGNORE_INDEX)
    elif family == "encoder":
        chosen = torch.rand(ids.shape, generator=g) < 0.3
        batch["labels"] = ids.masked_fill(~chosen | (mask == 0), IGNORE_INDEX)
    else:
        labels = torch.randint(5, model.config.vocab_size, (3, 7), generator=g)
        labels[0, 5:] = IGNORE_INDEX
        batch["labels"] = labels
    return batch


def _loss_and_grads(model: lmkit.Model, batch: dict, **kw) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(**batch, **kw)
    out.loss_sum.backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


@pytest.mark.parametrize("key", VOCAB_HEADS)
def test_loss_without_logits_equals_the_plain_loss_and_its_gradients(key, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 5 * 512)  # several chunks of 5 rows
    monkeypatch.setattr(loss_module, "SMALL_LOGITS", 0)  # chunked however small
    model = variant(key)
    if key == "seq2seq-learned-bart":  # a real bias to get a gradient for
        torch.nn.init.normal_(model.head.proj.bias)
    batch = _batch(key, model)
    plain, plain_grads = _loss_and_grads(model, batch)
    out = model(**batch, return_logits=False)
    assert out.logits is None
    fused, fused_grads = _loss_and_grads(model, batch, return_logits=False)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_head_gets_no_gradient_and_the_rest_the_same(monkeypatch):
    monkeypatch.setattr(loss_module, "SMALL_LOGITS", 0)
    model = variant("decoder-rotary-gqa")
    model.tokens.weight.requires_grad_(False)  # the tied projection: as in LoRA fine-tuning
    batch = _batch("decoder-rotary-gqa", model)
    _, plain = _loss_and_grads(model, batch)
    _, fused = _loss_and_grads(model, batch, return_logits=False)
    assert "tokens.weight" not in fused and fused.keys() == plain.keys()
    for name, g in plain.items():
        torch.testing.assert_close(fused[name], g, rtol=1e-5, atol=1e-6)


def test_loss_without_logits_under_bf16_autocast_is_close_to_the_plain_one(monkeypatch):
    monkeypatch.setattr(loss_module, "SMALL_LOGITS", 0)
    model = variant("decoder-rotary-gqa")
    batch = _batch("decoder-rotary-gqa", model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = _loss_and_grads(model, batch)
        fused, fused_grads = _loss_and_grads(model, batch, return_logits=False)
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=0)
    for name, g in plain_grads.items():
        assert fused_grads[name].dtype == g.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), g.flatten(), 0)
        assert cos > 0.99, name


@pytest.mark.parametrize("small", [0, loss_module.SMALL_LOGITS])  # chunked, plain
def test_no_target_gives_a_zero_loss_that_still_backpropagates(small, monkeypatch):
    monkeypatch.setattr(loss_module, "SMALL_LOGITS", small)
    model = variant("encoder-learned")
    batch = _batch("encoder-learned", model)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    out = model(**batch, return_logits=False)
    out.loss_sum.backward()
    assert out.loss_sum.item() == 0.0 and out.num_targets.item() == 0


@pytest.mark.parametrize("key", ["decoder-learned-gpt2", "encoder-learned"])
def test_small_vocabulary_takes_the_plain_loss_with_the_same_numbers(key, monkeypatch):
    """Few logits (nanoGPT's 65 characters): the plain loss over every row, no chunk loop;
    the same loss and gradients as the chunked path."""
    model = variant(key)
    batch = _batch(key, model)
    rows = batch["labels"].numel()
    assert loss_module.small_logits(rows, model.config.vocab_size)
    calls, forward = [], loss_module.LinearCrossEntropy.forward
    monkeypatch.setattr(loss_module.LinearCrossEntropy, "forward",
                        staticmethod(lambda *a: calls.append(1) or forward(*a)))
    small, small_grads = _loss_and_grads(model, batch, return_logits=False)
    assert not calls  # the chunked function was not used
    monkeypatch.setattr(loss_module, "SMALL_LOGITS", 0)
    chunked, chunked_grads = _loss_and_grads(model, batch, return_logits=False)
    assert calls  # now it was
    torch.testing.assert_close(small, chunked, rtol=1e-6, atol=1e-6)
    assert small_grads.keys() == chunked_grads.keys()
    for name, g in chunked_grads.items():
        torch.testing.assert_close(small_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("key", ["decoder-rotary-gqa", "encoder-learned", "seq2seq-relative-t5"])
def test_activation_checkpointing_gives_the_same_gradients_with_dropout(key):
    name, overrides = VARIANTS[key]
    model = lmkit.Model(lmkit.preset(name, **overrides, dropout=0.1)).train()
    batch = _batch(key, model)
    torch.manual_seed(5)
    plain, plain_grads = _loss_and_grads(model, batch)
    model.activation_checkpointing(True)
    torch.manual_seed(5)  # the same dropout masks: recomputation replays the RNG
    again, grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    for n, g in plain_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-6, atol=1e-7, msg=n)
    model.eval()
    with torch.no_grad():  # inference runs the blocks once, as without the switch
        on = model(**batch).loss
        model.activation_checkpointing(False)
        torch.testing.assert_close(on, model(**batch).loss, rtol=0, atol=0)


def test_training_with_activation_checkpointing_follows_the_same_losses(tmp_path):
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        model = lmkit.Model(lmkit.preset("tiny-decoder", dropout=0.1))
        rows = torch.randint(5, 500, (4, 24), generator=torch.Generator().manual_seed(0))
        batches = ({"input_ids": rows, "labels": rows} for _ in range(4))
        cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, eval_every=0,
                          save_every=0, progress=False, tensorboard=False, plot=False,
                          activation_checkpointing=on)
        results.append(train(model, batches, cfg, tmp_path / str(on)).losses)
    assert results[0] == pytest.approx(results[1], rel=1e-6)
