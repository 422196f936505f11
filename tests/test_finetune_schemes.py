"""LoRA adapters and fine-tuning schemes."""

import pytest
import torch
from conftest import tiny

import lmkit
from lmkit.finetune import (
    LoRAConfig,
    apply_lora,
    apply_scheme,
    load_adapter,
    lr_scales,
    merge_lora,
    save_adapter,
)
from lmkit.model.lora import LoRALinear


def classifier():
    return tiny("tiny-encoder", head="classification", label_names=["a", "b", "c"])


def perturb_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.1)


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-decoder", "tiny-seq2seq"])
def test_lora_merged_equals_unmerged(name):
    model = tiny(name)
    ids = torch.randint(3, 500, (2, 9))
    kw = {"decoder_input_ids": ids} if name == "tiny-seq2seq" else {}
    before = model(ids, **kw).logits
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q", "v", "up")))
    assert names and all(n.endswith((".q", ".v", ".up")) for n in names)
    torch.testing.assert_close(model(ids, **kw).logits, before)  # B = 0: starts as the base
    perturb_adapters(model)
    unmerged = model(ids, **kw).logits
    assert not torch.allclose(unmerged, before)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids, **kw).logits, unmerged, atol=1e-5, rtol=0)


def test_lora_scheme_trains_adapters_and_head_only():
    model = classifier()
    counts = apply_scheme(model, "lora", lora=LoRAConfig(rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable)
    assert counts["trainable"] < counts["total"] / 5
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(3, 500, (4, 8))
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_adapter_save_and_load(tmp_path):
    model = classifier()
    model.save(tmp_path / "base")
    apply_scheme(model, "lora", lora=LoRAConfig(rank=2, targets=("q", "k", "v", "o")))
    perturb_adapters(model)
    ids = torch.randint(3, 500, (2, 6))
    expected = model(ids).logits
    model.save(tmp_path / "unmerged")  # adapters are part of the architecture (config.lora)
    reloaded = lmkit.load(tmp_path / "unmerged").eval()
    assert reloaded.config.lora == {"rank": 2, "alpha": 16.0, "dropout": 0.0,
                                    "targets": ["q", "k", "v", "o"]}
    torch.testing.assert_close(reloaded(ids).logits, expected)
    save_adapter(model, tmp_path / "adapter", base=str(tmp_path / "base"))
    size = sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir())
    assert size < (tmp_path / "base" / "model.safetensors").stat().st_size / 2
    fresh = load_adapter(lmkit.load(tmp_path / "base").eval(), tmp_path / "adapter")
    torch.testing.assert_close(fresh(ids).logits, expected)
    merge_lora(fresh).save(tmp_path / "merged")
    merged = lmkit.load(tmp_path / "merged")
    assert merged.config.lora is None
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=0)


def test_frozen_and_top_k():
    model = classifier()
    apply_scheme(model, "frozen")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "head.proj.weight", "head.proj.bias"}
    model = classifier()
    apply_scheme(model, "top-k", top_k=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.layers.1.") for n in trainable)
    assert not any(n.startswith(("encoder.layers.0.", "tokens.")) for n in trainable)
    with pytest.raises(ValueError, match="top_k=5"):
        apply_scheme(classifier(), "top-k", top_k=5)
    with pytest.raises(ValueError, match="unknown fine-tuning scheme"):
        apply_scheme(classifier(), "adapters")
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoRAConfig(targets=("qkv",))


def test_layerwise_lr_decay():
    scales = lr_scales(classifier(), decay=0.5)  # 2 blocks: embeddings 0.125, blocks .25/.5
    assert scales["head.proj.weight"] == 1.0
    assert scales["encoder.layers.1.attn.q.weight"] == 0.5
    assert scales["encoder.layers.0.attn.q.weight"] == 0.25
    assert scales["tokens.weight"] == scales["encoder.positions.weight"] == 0.125
    assert set(lr_scales(classifier(), decay=None).values()) == {1.0}


def test_layer_decay_sets_each_parameters_learning_rate():
    """The optimizer gives every parameter lr x its scale, and the schedule scales them all."""
    from lmkit.train.optim import build_optimizer, build_scheduler

    model = classifier()
    scales = lr_scales(model, decay=0.5)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in opt.param_groups:
        for p in group["params"]:
            assert group["lr"] == pytest.approx(1e-3 * scales[names[id(p)]])
            seen.add(names[id(p)])
    assert seen == set(scales)
    sched = build_scheduler(opt, "constant", warmup_steps=2, total_steps=10)
    low = min(g["lr"] for g in opt.param_groups)
    assert low == pytest.approx(1e-3 * 0.125 / 2)  # warmup step 0 of 2 halves every rate
    sched.step()
    assert min(g["lr"] for g in opt.param_groups) == pytest.approx(1e-3 * 0.125)
