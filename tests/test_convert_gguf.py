"""GGUF import on small files written here with the `gguf` package the way llama.cpp's
converter writes them (Q/K rows permuted, optional Q8_0 quantization, tokenizer metadata)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

import lmkit
from lmkit.convert.gguf import tokenizer_from_gguf

NAMES = {"tokens.weight": "token_embd.weight", "decoder.final_norm.weight": "output_norm.weight",
         "head.proj.weight": "output.weight"}
LAYER = {"attn_norm": "attn_norm", "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v",
         "attn.o": "attn_output", "mlp_norm": "ffn_norm", "mlp.gate": "ffn_gate",
         "mlp.up": "ffn_up", "mlp.down": "ffn_down"}
SPECIALS = ["<s>", "</s>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def _vocab() -> list[str]:
    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of Q/K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def gguf_writer(path, arch: str, layers: int, context: int, hidden: int, ffn: int, heads: int,
                kv_heads: int, theta: float, eps: float) -> gguf.GGUFWriter:
    """A GGUFWriter with the hyperparameters every architecture here has."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(eps)
    return w


def write_gguf(path, model: lmkit.Model, arch: str = "llama", quantize: bool = False,
               add_bos: bool = True) -> None:
    cfg = model.config
    w = gguf_writer(path, arch, cfg.decoder_layers, cfg.max_positions, cfg.hidden_size,
                    cfg.intermediate_size, cfg.num_heads, cfg.kv_heads, cfg.rope_theta,
                    cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = _vocab()
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(1)
    w.add_add_bos_token(add_bos)
    for name, t in model.state_dict().items():
        if name in model.tied_names():
            continue
        if name.startswith("decoder.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            target = f"blk.{i}.{LAYER[rest]}.weight"
        else:
            target = NAMES[name]
        arr = t.detach().float().numpy()
        if rest_is(name, "attn.q"):
            arr = _permute(arr, cfg.num_heads)
        elif rest_is(name, "attn.k"):
            arr = _permute(arr, cfg.kv_heads)
        if quantize and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(target, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(target, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rest_is(name: str, part: str) -> bool:
    return name.startswith("decoder.layers.") and name.endswith(f".{part}.weight")


def _model(**overrides) -> lmkit.Model:
    torch.manual_seed(0)
    model = lmkit.Model(lmkit.preset("tiny-decoder", **overrides)).eval()
    with torch.no_grad():  # norms away from 1 so a mapping mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_float_weights_load_exactly(tmp_path, tied):
    model = _model(tie_embeddings=tied, rope_theta=5000.0)
    write_gguf(tmp_path / "m.gguf", model)
    loaded = lmkit.load(tmp_path / "m.gguf")
    cfg = loaded.config
    assert (cfg.kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (2, 5000.0, tied)
    assert not loaded.training
    for name, t in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=0, atol=0)
    ids = torch.randint(3, 261, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_gguf_quantized_weights_are_dequantized(tmp_path):
    model = _model()
    write_gguf(tmp_path / "q.gguf", model, quantize=True)
    loaded = lmkit.load(tmp_path / "q.gguf", dtype="bfloat16")
    assert loaded.tokens.weight.dtype == torch.bfloat16 and loaded.config.dtype == "bfloat16"
    for name, t in model.state_dict().items():
        # Q8_0: one scale per 32 values, so the error is at most half a step of 1/127 of the
        # block's largest value (plus bfloat16 rounding)
        err = (loaded.state_dict()[name].float() - t).abs().max()
        assert err <= t.abs().max() / 127 + t.abs().max() / 64, name
    q = loaded.decoder.layers[0].attn.q.weight.float()
    assert torch.corrcoef(torch.stack([q.flatten(), model.decoder.layers[0].attn.q.weight
                                       .flatten()]))[0, 1] > 0.999  # rows in the right order


def test_gguf_tokenizer_from_metadata(tmp_path):
    write_gguf(tmp_path / "m.gguf", _model())
    tok = lmkit.load(tmp_path / "m.gguf").tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    vocab = _vocab()
    assert tok.encode("the the") == [0, vocab.index("t"), vocab.index("he"), vocab.index("Ġthe")]
    assert tok.encode("</s>", add_special_tokens=False) == [1]  # control tokens stay whole
    assert tok.decode(tok.encode("the the")) == "the the"


def test_gguf_tokenizer_without_bos_and_unknown_models():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": _vocab(),
            "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.eos_token_id": 1}
    tok = tokenizer_from_gguf(meta)
    assert tok.encode("the") == [_vocab().index("t"), _vocab().index("he")]
    assert tokenizer_from_gguf({**meta, "tokenizer.ggml.model": "bert"}) is None


def test_gguf_unsupported_architecture(tmp_path):
    write_gguf(tmp_path / "m.gguf", _model(), arch="mamba")
    with pytest.raises(lmkit.CheckpointError, match="'mamba' is not supported.*llama"):
        lmkit.load(tmp_path / "m.gguf")


def test_gguf_new_head(tmp_path):
    write_gguf(tmp_path / "m.gguf", _model(tie_embeddings=False))
    model = lmkit.load(tmp_path / "m.gguf", head="classification", label_names=["a", "b"])
    assert model.new_tensors == ["head.proj.weight"]  # Llama's `score` has no bias, as in HF
    assert model(torch.randint(3, 261, (2, 5))).logits.shape == (2, 2)


def test_gguf_converts_to_a_transformers_folder(tmp_path):
    import transformers as tf

    from lmkit.loading import convert

    write_gguf(tmp_path / "m.gguf", _model(tie_embeddings=False))
    out = convert(tmp_path / "m.gguf", tmp_path / "hf", to="hf")
    model = lmkit.load(tmp_path / "m.gguf")
    ref = tf.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 261, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids).logits)
    tok = tf.AutoTokenizer.from_pretrained(out)
    assert tok("the the")["input_ids"] == model.tokenizer.encode("the the")


def test_gguf_qwen2_tokenizer_matches_transformers():
    """llama.cpp's "qwen2" pre-tokenizer (Qwen2 and Qwen3 files): NFC, then single digits."""
    import transformers as tf

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": _vocab(),
            "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.pre": "qwen2"}
    tok = tokenizer_from_gguf(meta)
    ref = tf.Qwen2Tokenizer(vocab={t: i for i, t in enumerate(_vocab())},
                            merges=[tuple(m.split(" ")) for m in MERGES])
    for text in ["the 2024 the", "cafe\u0301\n\n the  12345", "x's 7.5%\tthe"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.encode("123", add_special_tokens=False) == [_vocab().index(c) for c in "123"]
