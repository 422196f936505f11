"""LoRA adapters in PEFT's layout, both ways: an lmkit adapter loaded by PEFT onto the
transformers model gives lmkit's outputs, and an adapter PEFT trained loads into lmkit."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from test_convert_hf import CASES, _randomise

import lmkit
from lmkit.convert.peft import save_peft
from lmkit.errors import CheckpointError
from lmkit.model.lora import LoRAConfig, LoRALinear, apply_lora

# case -> lmkit LoRA targets (GPT-2: its Conv1D layers; q/k/v are one fused c_attn tensor)
TARGETS = {"llama": ("q", "v", "gate", "down"), "bert-cls": ("q", "v", "up"),
           "roberta-tok": ("k", "o"), "t5": ("q", "v", "o"), "bart": ("q", "k", "up"),
           "gpt2": ("o", "up")}
# case -> PEFT target_modules and task type for the other direction
PEFT_TARGETS = {"llama": (["q_proj", "v_proj", "up_proj"], "CAUSAL_LM"),
                "bert-cls": (["query", "value"], "SEQ_CLS"),
                "t5": (["q", "v", "wo"], "SEQ_2_SEQ_LM"),
                "bart": (["q_proj", "out_proj", "fc2"], "SEQ_2_SEQ_LM")}


def _hf_folder(tmp_path, case):
    cls, cfg = CASES[case]
    model = cls(cfg)
    _randomise(model)
    model.save_pretrained(tmp_path / case)
    return cls, tmp_path / case


def _inputs(model_family):
    ids = torch.randint(4, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    return ids, ({"decoder_input_ids": ids} if model_family == "encoder-decoder" else {})


@pytest.mark.parametrize("case", list(TARGETS))
def test_lmkit_adapter_loads_in_peft(tmp_path, case):
    cls, base = _hf_folder(tmp_path, case)
    model = lmkit.load(base)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=TARGETS[case]))
    with torch.no_grad():  # trained adapters and head, not B = 0
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.1)
        for p in model.head_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_peft(model, tmp_path / "adapter", base=base)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(base)

    ids, kw = _inputs(model.config.family)
    ours = model(ids, **kw).logits
    theirs = peft.PeftModel.from_pretrained(cls.from_pretrained(base), tmp_path / "adapter")
    torch.testing.assert_close(theirs.eval()(input_ids=ids, **kw).logits, ours,
                               atol=2e-5, rtol=1e-4)
    back = lmkit.load(base, adapter=tmp_path / "adapter")  # and back into lmkit
    torch.testing.assert_close(back(ids, **kw).logits, ours)


@pytest.mark.parametrize("case", list(PEFT_TARGETS))
def test_peft_adapter_loads_in_lmkit(tmp_path, case):
    cls, base = _hf_folder(tmp_path, case)
    targets, task = PEFT_TARGETS[case]
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type=task)
    trained = peft.get_peft_model(cls.from_pretrained(base), config)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(std=0.1)
    trained.save_pretrained(tmp_path / "adapter")
    model = lmkit.load(base, adapter=tmp_path / "adapter")
    assert model.config.lora["rank"] == 4 and model.config.lora["alpha"] == 16
    ids, kw = _inputs(model.config.family)
    expected = trained.eval()(input_ids=ids, **kw).logits
    torch.testing.assert_close(model(ids, **kw).logits, expected, atol=2e-5, rtol=1e-4)


def test_fused_and_foreign_adapters_are_refused(tmp_path):
    _, base = _hf_folder(tmp_path, "gpt2")
    model = lmkit.load(base)
    apply_lora(model, LoRAConfig(rank=2, targets=("q", "v")))
    with pytest.raises(CheckpointError, match="fused with others"):
        save_peft(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()  # nothing half-written

    _, llama = _hf_folder(tmp_path, "llama")
    model = lmkit.load(llama)
    apply_lora(model, LoRAConfig(rank=2, targets=("q",)))
    save_peft(model, tmp_path / "llama-adapter")
    with pytest.raises(CheckpointError, match="does not fit"):  # a Llama adapter on GPT-2
        lmkit.load(base, adapter=tmp_path / "llama-adapter")
    config = tmp_path / "llama-adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(CheckpointError, match="use_dora=True is a LoRA variant"):
        lmkit.load(llama, adapter=tmp_path / "llama-adapter")


def test_lora_finetuning_writes_a_peft_adapter(tmp_path):
    """A LoRA run on a Hugging Face BERT writes <run>/peft: PEFT puts it on the transformers
    classifier and gives the outputs of the (merged) fine-tuned folder."""
    import transformers as tf

    from lmkit.finetune import FinetuneConfig, finetune
    from lmkit.tokenizer import Tokenizer

    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "grim"]
    (tmp_path / "corpus.txt").write_text(" ".join(words * 20) + "\n")
    tok = Tokenizer.train([tmp_path / "corpus.txt"], "wordpiece", 120, family="encoder")
    hf = tf.BertForMaskedLM(tf.BertConfig(**{**CASES["bert"][1].to_dict(),
                                            "vocab_size": tok.vocab_size,
                                            "pad_token_id": tok.pad_id}))
    hf.save_pretrained(tmp_path / "base")
    tok.save(tmp_path / "base")
    rows = [f"{w} {v}\t{'pos' if i % 2 == 0 else 'neg'}"
            for i, w in enumerate(words) for v in words[::2]]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    cfg = FinetuneConfig(task="classification", train=str(tmp_path / "train.tsv"),
                         out=str(tmp_path / "run"), scheme="lora", steps=3, batch_size=8,
                         lr=1e-2, progress=False, tensorboard=False, plot=False)
    run = finetune(tmp_path / "base", cfg).out_dir
    config = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"]

    ids = torch.tensor(tok.encode_batch(["good fine", "bad poor"]))
    expected = lmkit.load(run)(ids).logits
    base = tf.BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base, run / "peft").eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=2e-5, rtol=1e-4)
