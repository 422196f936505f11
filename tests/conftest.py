import os

import pytest
import torch

import lmkit

# `make test` runs two pytest workers (pytest-xdist) on CI's two cores: one thread each, in
# the workers and in the processes they start, so that they do not fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(name: str, **overrides) -> lmkit.Model:
    """A tiny model in eval mode (dropout off) for exact comparisons."""
    return lmkit.Model(lmkit.preset(name, **overrides)).eval()


# Every family and position scheme the core supports, as tiny configs.
VARIANTS = {
    "encoder-learned": ("tiny-encoder", {}),
    "encoder-rotary-pre-rms": ("tiny-encoder", dict(position="rotary", norm="rmsnorm",
                                                    norm_position="pre", final_norm=True)),
    # ModernBERT-shaped: local blocks see 2 positions each side, their own rotary base
    "encoder-rotary-local": ("tiny-encoder", dict(
        position="rotary", norm_position="pre", final_norm=True, first_attn_norm=False,
        norm_bias=False, gated_mlp=True, encoder_layers=3, window=2,
        layer_types=["global", "local", "global"], local_rope_theta=100.0)),
    "decoder-rotary-gqa": ("tiny-decoder", {}),
    "decoder-rotary-partial-mqa": ("tiny-decoder", dict(num_kv_heads=1, rotary_fraction=0.5)),
    "decoder-learned-gpt2": ("tiny-decoder", dict(position="learned", norm="layernorm",
                                                  activation="gelu_tanh", gated_mlp=False,
                                                  attention_bias=True, mlp_bias=True,
                                                  num_kv_heads=None)),
    "decoder-sinusoidal-post": ("tiny-decoder", dict(position="sinusoidal",
                                                     norm_position="post", final_norm=False)),
    "seq2seq-relative-t5": ("tiny-seq2seq", {}),
    "seq2seq-learned-bart": ("tiny-seq2seq", dict(position="learned", norm="layernorm",
                                                  norm_position="post", final_norm=False,
                                                  embed_norm=True, activation="gelu",
                                                  position_offset=2, lm_head_bias=True,
                                                  scale_attention=True, output_scale=1.0)),
    "seq2seq-sinusoidal-2017": ("tiny-seq2seq", dict(position="sinusoidal",
                                                     scale_embeddings=True,
                                                     scale_attention=True, output_scale=1.0)),
    "seq2seq-rotary-gated": ("tiny-seq2seq", dict(position="rotary", gated_mlp=True,
                                                  activation="gelu_tanh", num_kv_heads=2)),
}


def gguf_reference(path):
    """transformers' Llama on transformers' own reading (dequantization, Q/K un-permutation)
    of a GGUF file: built on the meta device and filled, to keep tests fast."""
    import transformers as tf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(str(path))["config"]
    config = tf.LlamaConfig(**{k: v for k, v in meta.items()
                               if k not in ("model_type", "_model_name_or_path")})
    with torch.device("meta"):
        ref = tf.LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)["tensors"]
    ref.load_state_dict(tensors, strict=False, assign=True)
    ref.model.rotary_emb = type(ref.model.rotary_emb)(config)  # a buffer, not in the file
    if config.tie_word_embeddings:
        ref.lm_head.weight = ref.model.embed_tokens.weight
    return ref.eval()


def variant(key: str) -> lmkit.Model:
    name, overrides = VARIANTS[key]
    return tiny(name, **overrides)


def family_of(key: str) -> str:
    return lmkit.preset(VARIANTS[key][0]).family


@pytest.fixture(autouse=True, scope="session")
def _cpu_without_native_bf16():
    """The suite runs as on a CPU without native bf16 (precision "auto" = fp32), so its exact
    fp32 comparisons hold on every machine; tests/test_precision.py mocks the other cases.
    Session scope, so module-scoped fixtures that train see it too. Subprocesses (CLI tests)
    see the real hardware."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        yield


@pytest.fixture(autouse=True, scope="session")
def _private_registry(tmp_path_factory):
    """No test sees (or fills) the user's registry, model cache or Hugging Face cache under
    ~/.cache: names resolve in empty folders of the session (subprocesses inherit them)."""
    root = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as patch:
        for key in ("LMKIT_REGISTRY", "LMKIT_CACHE", "HF_HUB_CACHE"):
            patch.setenv(key, str(root / key.lower()))
        yield
