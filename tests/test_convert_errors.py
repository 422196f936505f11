"""Hugging Face folders that cannot be used as they are get one clear error each; and the
reading paths that are not the common single safetensors file (shards, pickles, new heads)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import lmkit
from lmkit.convert import registry

BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)


@pytest.fixture
def bert_dir(tmp_path):
    torch.manual_seed(0)
    model = tf.BertForMaskedLM(tf.BertConfig(**BERT)).eval()
    model.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert", model


def _edit_weights(folder, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(lmkit.CheckpointError, match="'mamba' is not supported") as e:
        lmkit.load(tmp_path)
    for name in ("bert", "roberta", "distilbert", "gpt2", "llama", "bart", "marian", "t5"):
        assert name in str(e.value)
    assert set(registry()) == {"bert", "roberta", "xlm-roberta", "distilbert", "modernbert",
                               "gpt2", "llama", "bart", "marian", "t5", "mt5", "mistral",
                               "qwen2", "qwen3", "gemma", "phi3"}


def test_unsupported_architecture_and_config(bert_dir):
    path, _ = bert_dir
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "architectures": ["BertForQA"]}))
    with pytest.raises(lmkit.CheckpointError, match="BertForQA is not supported.*BertForMaskedLM"):
        lmkit.load(path)
    relative = {**raw, "position_embedding_type": "relative_key"}
    (path / "config.json").write_text(json.dumps(relative))
    with pytest.raises(lmkit.CheckpointError, match="position_embedding_type"):
        lmkit.load(path)


def test_missing_tensor(bert_dir):
    path, _ = bert_dir
    _edit_weights(path, lambda t: t.pop("bert.encoder.layer.1.output.dense.weight"))
    with pytest.raises(lmkit.CheckpointError, match=r"missing tensors \(1\): "
                       r"encoder\.layers\.1\.mlp\.down\.weight") as e:
        lmkit.load(path)
    assert "encoder.layer.1.output.dense" in str(e.value)  # the HF name, as a hint


def test_extra_tensor(bert_dir):
    path, _ = bert_dir
    _edit_weights(path, lambda t: t.update({"bert.encoder.layer.0.adapter.weight":
                                            torch.zeros(2)}))
    with pytest.raises(lmkit.CheckpointError,
                       match=r"unexpected tensors \(1\): encoder\.layer\.0\.adapter\.weight"):
        lmkit.load(path)


def test_shape_mismatch(bert_dir):
    path, _ = bert_dir
    _edit_weights(path, lambda t: t.update({"bert.embeddings.position_embeddings.weight":
                                            torch.zeros(32, 32)}))
    with pytest.raises(lmkit.CheckpointError, match=r"shape mismatches \(1\): encoder\.positions"
                       r"\.weight: checkpoint \(32, 32\) vs model \(64, 32\)"):
        lmkit.load(path)


def test_tokenizer_larger_than_embedding(bert_dir):
    path, _ = bert_dir
    vocab = {f"w{i}": i for i in range(120)} | {"[UNK]": 120}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    with pytest.raises(lmkit.CheckpointError, match="121 tokens but the model's embedding has "
                       "only 99 rows"):
        lmkit.load(path)


def test_pickle_only_folder_needs_allow_pickle(bert_dir):
    path, ref = bert_dir
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(lmkit.CheckpointError, match="allow_pickle=True"):
        lmkit.load(path)
    model = lmkit.load(path, allow_pickle=True)
    ids = torch.randint(4, 99, (2, 6))
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids))


def test_sharded_safetensors(tmp_path):
    torch.manual_seed(0)
    ref = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64)).eval()
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(4, 99, (2, 6))
    torch.testing.assert_close(_logits(lmkit.load(tmp_path), ids), _logits(ref, ids))


def test_new_head_keeps_bert_pooler(tmp_path):
    """A BertModel (body + pooler) loaded for classification keeps the pooler as the head's
    dense layer and initialises only the output projection."""
    torch.manual_seed(0)
    ref = tf.BertModel(tf.BertConfig(**BERT)).eval()
    ref.save_pretrained(tmp_path)
    model = lmkit.load(tmp_path, head="classification", label_names=["a", "b", "c"])
    assert model.new_tensors == ["head.proj.bias", "head.proj.weight"]
    torch.testing.assert_close(model.head.dense.weight, ref.pooler.dense.weight)
    assert model(torch.randint(4, 99, (2, 5))).logits.shape == (2, 3)


def test_new_head_replaces_mlm_head(bert_dir):
    path, ref = bert_dir
    model = lmkit.load(path, head="token-classification", label_names=["O", "B", "I"])
    assert model.new_tensors == ["head.proj.bias", "head.proj.weight"]
    ids = torch.randint(4, 99, (2, 5))
    with torch.no_grad():
        hidden = ref.bert(ids).last_hidden_state
    torch.testing.assert_close(model(ids).hidden_states, hidden)


def test_head_from_weights_when_config_names_no_architecture(bert_dir, tmp_path):
    path, _ = bert_dir
    raw = json.loads((path / "config.json").read_text())
    del raw["architectures"]
    (path / "config.json").write_text(json.dumps(raw))
    assert lmkit.load(path).config.head == "mlm"  # the MLM head's tensors are there
    tf.BertModel(tf.BertConfig(**BERT)).save_pretrained(tmp_path / "body")
    body = json.loads((tmp_path / "body" / "config.json").read_text())
    del body["architectures"]
    (tmp_path / "body" / "config.json").write_text(json.dumps(body))
    assert lmkit.load(tmp_path / "body").config.head == "none"
