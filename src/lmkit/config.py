"""ModelConfig: an architecture as plain data.

Every difference between model families (BERT, GPT-2, Llama, BART, T5, Marian, the 2017
Transformer) is a field here, never a new class. A config is JSON on disk (`config.json` in a
checkpoint folder) and round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkit.errors import ConfigError
from lmkit.textfiles import read_json

FAMILIES = ("encoder", "decoder", "encoder-decoder")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "sinusoidal", "rotary", "relative", "none")
POOLINGS = ("first", "last", "mean", "eos")
LAYER_TYPES = ("global", "local")  # a block attends to every key, or within `window`
DEFAULT_POOLING = {"encoder": "first", "decoder": "last", "encoder-decoder": "last"}
DTYPES = ("float32", "bfloat16", "float16")
# Rotary scaling kinds and the keys each needs besides `type` and `factor` (Hugging Face's
# rope_type linear, dynamic NTK, Llama 3 frequency bands).
ROPE_SCALINGS = {"linear": (), "dynamic": ("original_max_positions",),
                 "llama3": ("original_max_positions", "low_freq_factor", "high_freq_factor"),
                 "yarn": ("original_max_positions", "beta_fast", "beta_slow", "attention_factor",
                          "truncate")}
IGNORE_INDEX = -100  # the label id the loss skips (padding, prompts, unpicked tokens)


@dataclass(frozen=True)
class Head:
    """What the code needs to know about a task head: one row of `HEADS` per head.

    module: the class in lmkit.model.heads (None: no head, the model returns hidden states).
    tied_output: its output projection can share the token embeddings (`tie_embeddings`).
    needs_label_names: its outputs are the class / tag names in `config.label_names`.
    pooled: it reads one vector per sequence (`config.pooling` says which).
    shifts_labels: on a decoder-only model the labels are the input ids and the model shifts
        them (position t predicts token t + 1).
    families: the model families it fits.
    """

    module: str | None
    tied_output: bool = False
    needs_label_names: bool = False
    pooled: bool = False
    shifts_labels: bool = False
    families: tuple[str, ...] = FAMILIES


HEADS: dict[str, Head] = {
    "none": Head(None),
    "lm": Head("LMHead", tied_output=True, shifts_labels=True),
    "mlm": Head("MLMHead", tied_output=True, families=("encoder", "encoder-decoder")),
    "classification": Head("ClassificationHead", needs_label_names=True, pooled=True),
    "token-classification": Head("TokenClassificationHead", needs_label_names=True),
}

RENAMED = {"labels": "label_names"}  # config.json keys written by earlier versions -> fields
# Fields added after config.json files were first written: their default is what the earlier
# versions computed, so a file without them means exactly that (any other field must be there).
ADDED = ("norm_bias", "first_attn_norm", "window", "layer_types", "local_rope_theta",
         "classifier_norm", "classifier_bias", "head_dense_bias", "rope_scaling",
         "attention_out_bias", "qk_norm", "sliding_window", "norm_offset")


@dataclass
class ModelConfig:
    """The architecture of a Transformer model. See `PRESETS` for named examples."""

    family: str = "decoder"
    vocab_size: int = 32000
    hidden_size: int = 512
    num_heads: int = 8
    num_kv_heads: int | None = None  # None = num_heads (multi-head); 1 = multi-query
    head_dim: int | None = None  # None = hidden_size // num_heads (T5 sets it apart)
    encoder_layers: int = 0
    decoder_layers: int = 0
    intermediate_size: int = 2048
    # MLP: activation(x W_up) W_down, or gated: (activation(x W_gate) * x W_up) W_down
    activation: str = "gelu"
    gated_mlp: bool = False
    norm: str = "layernorm"
    norm_position: str = "pre"  # "pre" (GPT-2, Llama, T5) or "post" (BERT, BART, 2017)
    final_norm: bool = True  # a norm after the last block (pre-norm models have one)
    embed_norm: bool = False  # a norm right after the embeddings (BERT, BART)
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorms have a bias (ModernBERT's do not)
    # The first block normalises its attention input; ModernBERT's does not (embed_norm just did)
    first_attn_norm: bool = True
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores w for (1 + w)
    position: str = "learned"
    max_positions: int = 1024
    position_offset: int = 0  # learned-position index of position 0 (RoBERTa, BART: 2)
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # share of each head's dims that are rotated
    # Rotary frequency scaling, or None: {"type": one of ROPE_SCALINGS, "factor": f, ...}
    rope_scaling: dict[str, Any] | None = None
    relative_buckets: int = 32
    relative_max_distance: int = 128
    # Local attention (ModernBERT): a "local" block's queries see only keys at most `window`
    # positions away; layer_types gives each block's kind, bottom to top ([] = every block
    # "local" when a window is set, else "global"); local blocks rotate with local_rope_theta
    # (None: rope_theta).
    window: int | None = None
    layer_types: list[str] = field(default_factory=list)
    local_rope_theta: float | None = None
    type_vocab_size: int = 0  # token-type (segment A/B) embeddings, BERT-style; 0 = none
    attention_bias: bool = True
    attention_out_bias: bool | None = None  # bias on the output projection; None = attention_bias
    qk_norm: bool = False  # a norm over each head's queries and keys before rotary (Qwen3)
    sliding_window: int | None = None  # a causal query sees only its last n keys (Mistral)
    mlp_bias: bool = True
    scale_attention: bool = True  # divide scores by sqrt(head_dim); T5 does not
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(hidden) (2017, Marian)
    tie_embeddings: bool = True  # output projection shares the input embedding matrix
    output_scale: float = 1.0  # hidden states are multiplied by this before the LM head (T5)
    lm_head_bias: bool = False  # a bias on the output projection (BART's final_logits_bias)
    dropout: float = 0.0
    attention_dropout: float = 0.0
    # dropout on the MLP's hidden activations (T5, BART's activation_dropout); None = dropout.
    # BERT and GPT-2 have none there: their converters and presets say 0.
    activation_dropout: float | None = None
    pad_id: int | None = 0
    bos_id: int | None = None
    eos_id: int | list[int] | None = None  # a list: generation stops at any (Llama 3)
    decoder_start_id: int | None = None  # first decoder token of encoder-decoder models
    dtype: str = "float32"
    # The task head on top of the body.
    head: str = "lm"
    label_names: list[str] = field(default_factory=list)  # class / tag names of task heads
    # How classification reduces a sequence to one vector; None = the family's default
    # (DEFAULT_POOLING: the first token of an encoder, the last real token of a decoder).
    pooling: str | None = None
    classifier_hidden: bool = False  # dense + activation before the classifier (BERT pooler)
    classifier_activation: str = "tanh"
    classifier_norm: bool = False  # a norm after that dense layer (ModernBERT)
    classifier_bias: bool = True  # a bias on the label projection (GPT-2, Llama `score`: none)
    head_dense_bias: bool = True  # a bias on the heads' dense layers (ModernBERT: none)
    mlm_transform: bool = True  # dense + activation + norm before the MLM projection (BERT)
    # LoRA adapters on the blocks' linear layers (lmkit.model.lora.LoRAConfig as a dict), or
    # None. Part of the architecture so that a model with adapters saves and loads as is.
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.pooling is None:
            self.pooling = DEFAULT_POOLING.get(self.family, "first")
        self.check_types()
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def out_bias(self) -> bool:
        """Whether attention's output projection has a bias (Qwen2: q/k/v only)."""
        return self.attention_bias if self.attention_out_bias is None else \
            self.attention_out_bias

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def has_encoder(self) -> bool:
        return self.family in ("encoder", "encoder-decoder")

    @property
    def has_decoder(self) -> bool:
        return self.family in ("decoder", "encoder-decoder")

    @property
    def head_spec(self) -> Head:
        return HEADS[self.head]

    @property
    def tied_output(self) -> bool:
        """The head's output projection is the token embedding matrix (stored once)."""
        return self.tie_embeddings and self.head_spec.tied_output

    @property
    def shifts_labels(self) -> bool:
        """The labels are the input ids and the model shifts them (a decoder-only LM)."""
        return self.head_spec.shifts_labels and self.family == "decoder"

    def layer_type(self, i: int) -> str:
        """"global" or "local": how block i of a stack attends (see `window`)."""
        if self.layer_types:
            return self.layer_types[i]
        return "global" if self.window is None else "local"

    def fill_id(self, eos_id: int | None = None) -> int:
        """The id that fills padded positions: pad_id, else the end-of-sequence id (`eos_id`
        or the config's), else 0. Padding is masked, so any id in the vocabulary works."""
        eos = self.eos_ids[0] if eos_id is None and self.eos_ids else eos_id
        return next(i for i in (self.pad_id, eos, 0) if i is not None)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every end-of-sequence id (`eos_id` may be one id or a list)."""
        return eos_tuple(self.eos_id)

    # ---- validation ----------------------------------------------------------------------
    def check_types(self) -> None:
        """Raise TypeError naming every field whose value is not of its declared type (a
        string "12" is not a number, 1.5 is not an integer, True is not 1, NaN is not a
        number here); integers given for float fields become floats."""
        bad = []
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), _HINTS[f.name]
            if hint is float and _is_int(value):
                setattr(self, f.name, float(value))
            elif not _is_a(value, hint):
                bad.append(f"{f.name}={value!r} (expected {_describe(hint)})")
            elif isinstance(value, float) and not math.isfinite(value):
                bad.append(f"{f.name}={value} (expected a finite number)")
        if bad:
            raise TypeError(f"config fields of the wrong type: {'; '.join(bad)}")

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field and how to fix it."""

        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")

        for name, allowed in [("family", FAMILIES), ("activation", ACTIVATIONS),
                              ("norm", NORMS), ("position", POSITIONS), ("head", tuple(HEADS)),
                              ("pooling", POOLINGS), ("norm_position", ("pre", "post")),
                              ("dtype", DTYPES),
                              ("classifier_activation", ACTIVATIONS + ("tanh",))]:
            one_of(name, allowed)
        for name in ("vocab_size", "hidden_size", "num_heads", "intermediate_size",
                     "max_positions", "relative_buckets", "relative_max_distance",
                     "norm_eps", "rope_theta", "output_scale", "num_kv_heads", "head_dim",
                     "window", "local_rope_theta"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        for name in ("encoder_layers", "decoder_layers", "position_offset", "type_vocab_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("pad_id", "bos_id", "eos_id", "decoder_start_id"):
            value = getattr(self, name)
            if value == [] or any(not 0 <= i < self.vocab_size for i in eos_tuple(value)):
                raise ValueError(f"{name}={value} is not a token id of the vocabulary "
                                 f"(0..{self.vocab_size - 1}): fix it or set it to null")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads: "
                "change hidden_size or num_heads, or set head_dim explicitly")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"{self.num_heads} query heads cannot be grouped over {self.kv_heads} key/value "
                "heads: num_heads must be a multiple of num_kv_heads")
        if self.has_encoder and self.encoder_layers <= 0:
            raise ValueError(f"a {self.family} model needs encoder_layers > 0")
        if self.has_decoder and self.decoder_layers <= 0:
            raise ValueError(f"a {self.family} model needs decoder_layers > 0")
        if self.family == "encoder" and self.decoder_layers:
            raise ValueError("an encoder model has no decoder: set decoder_layers=0")
        if self.family == "decoder" and self.encoder_layers:
            raise ValueError("a decoder model has no encoder: set encoder_layers=0")
        if self.position == "rotary":
            rotated = int(self.dim_per_head * self.rotary_fraction)
            if not 0 < self.rotary_fraction <= 1 or rotated % 2:
                raise ValueError(
                    f"rotary_fraction={self.rotary_fraction} rotates {rotated} of "
                    f"{self.dim_per_head} head dims; it must rotate an even, non-zero number")
        self._check_local_attention()
        if self.position == "sinusoidal" and self.hidden_size % 2:
            raise ValueError("sinusoidal positions need an even hidden_size")
        if self.family == "encoder-decoder" and self.decoder_start_id is None:
            raise ValueError("an encoder-decoder model needs decoder_start_id (the first "
                             "decoder token; often the pad or bos id)")
        if self.family not in self.head_spec.families:
            raise ValueError(f"the {self.head} head does not fit a {self.family} model (it "
                             f"needs {' or '.join(self.head_spec.families)}); use head='lm' "
                             "for decoders")
        if self.head_spec.needs_label_names and not self.label_names:
            raise ValueError(f"a {self.head} head needs label_names (the class names)")
        if self.sliding_window is not None and (self.sliding_window <= 0 or not self.has_decoder):
            raise ValueError(f"sliding_window={self.sliding_window} needs a decoder and a "
                             "positive number of keys (or null for full attention)")
        if self.norm_offset and self.norm != "rmsnorm":
            raise ValueError("norm_offset applies to RMSNorm only: set norm='rmsnorm' or "
                             "norm_offset=0")
        if self.rope_scaling is not None:
            if self.position != "rotary":
                raise ValueError("rope_scaling needs position='rotary' (set it to null)")
            check_rope_scaling(self.rope_scaling)
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"label_names must be distinct, got {self.label_names}")

    def _check_local_attention(self) -> None:
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_types holds {bad}; each block is one of {LAYER_TYPES}")
        if self.layer_types:
            if self.family == "encoder-decoder":
                raise ValueError("layer_types is for encoder-only or decoder-only models: set "
                                 "it to [] (a window then applies to every block)")
            layers = self.encoder_layers + self.decoder_layers
            if len(self.layer_types) != layers:
                raise ValueError(f"layer_types names {len(self.layer_types)} blocks but the "
                                 f"model has {layers}: give one entry per block")
        if not self.first_attn_norm and self.norm_position != "pre":
            raise ValueError("first_attn_norm=False needs norm_position='pre' (a post-norm "
                             "block normalises its output, not its input)")
        if "local" in self.layer_types and self.window is None:
            raise ValueError("layer_types has local blocks but window is not set: set window "
                             "(how many positions a local query sees on each side)")

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """A config from a complete dict: every field must be there (config.json is written
        whole, so a missing field means a damaged or foreign file, never "use the default")."""
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object of fields, got {type(data).__name__}")
        data = {RENAMED.get(k, k): v for k, v in data.items()}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known fields: {sorted(fields)}")
        missing = [fields[k] for k in fields if k not in data and k not in ADDED]
        if missing:
            defaults = ", ".join(f"{f.name}={json.dumps(_default(f))}" for f in missing)
            raise ValueError(
                f"config fields missing: {[f.name for f in missing]}; the file is truncated or "
                f"was edited. Restore it, or add them if the model was trained with lmkit's "
                f"defaults ({defaults})")
        return cls(**data)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a config.json; any problem is a ConfigError naming the file."""
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path}: {e}; fix the file or re-save the checkpoint") from e

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_HINTS = typing.get_type_hints(ModelConfig)


def check_rope_scaling(scaling: dict[str, Any]) -> None:
    """Raise ValueError unless `scaling` is {"type": kind, "factor": f >= 1, + the kind's keys}
    with positive numbers."""
    kind = scaling.get("type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; choose one of "
                         f"{tuple(ROPE_SCALINGS)}")
    wanted = {"type", "factor", *ROPE_SCALINGS[kind]}
    if set(scaling) != wanted:
        raise ValueError(f"rope_scaling of type {kind} needs exactly the keys {sorted(wanted)}, "
                         f"got {sorted(scaling)}")
    for key in wanted - {"type", "truncate"}:
        value = scaling[key]
        if not (_is_a(value, float) and math.isfinite(value) and value > 0):
            raise ValueError(f"rope_scaling {key} must be a positive number, got {value!r}")
    if scaling["factor"] < 1:
        raise ValueError(f"rope_scaling factor must be >= 1, got {scaling['factor']}")
    if kind == "yarn" and not isinstance(scaling["truncate"], bool):
        raise ValueError(f"rope_scaling truncate must be true or false, "
                         f"got {scaling['truncate']!r}")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError("rope_scaling high_freq_factor must be larger than low_freq_factor")


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def eos_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    """One end-of-sequence id, a list of them or None, as a tuple."""
    return () if value is None else tuple(value) if isinstance(value, list) else (value,)


def _is_a(value: Any, hint: Any) -> bool:
    """Whether `value` has the type `hint` (int | None, float, str, bool, list[str],
    int | list[int], dict)."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_is_a(v, args[0]) for v in value)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, float) or _is_int(value)
    return isinstance(value, origin)


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             dict: "a mapping"}
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    return names.get(hint) or names.get(typing.get_origin(hint)) or str(hint)


# Named architectures. tiny-* are for tests (widths 32-64, a few layers).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-encoder": dict(family="encoder", vocab_size=512, hidden_size=64, num_heads=4,
                         encoder_layers=2, intermediate_size=128, norm_position="post",
                         embed_norm=True, final_norm=False, max_positions=128, head="mlm",
                         type_vocab_size=2, norm_eps=1e-12),
    "tiny-decoder": dict(family="decoder", vocab_size=512, hidden_size=64, num_heads=4,
                         num_kv_heads=2, decoder_layers=2, intermediate_size=128,
                         activation="silu", gated_mlp=True, norm="rmsnorm",
                         position="rotary", attention_bias=False, mlp_bias=False,
                         max_positions=256, head="lm", bos_id=1, eos_id=2),
    "tiny-seq2seq": dict(family="encoder-decoder", vocab_size=512, hidden_size=64, num_heads=4,
                         encoder_layers=2, decoder_layers=2, intermediate_size=128,
                         activation="relu", norm="rmsnorm", position="relative",
                         relative_buckets=16, relative_max_distance=64, attention_bias=False,
                         mlp_bias=False, scale_attention=False, max_positions=256, head="lm",
                         pad_id=0, eos_id=1, decoder_start_id=0, output_scale=64 ** -0.5),
    "bert-base": dict(family="encoder", vocab_size=30522, hidden_size=768, num_heads=12,
                      encoder_layers=12, intermediate_size=3072, norm_position="post",
                      embed_norm=True, final_norm=False, norm_eps=1e-12, max_positions=512,
                      type_vocab_size=2, head="mlm", pad_id=0, activation_dropout=0.0),
    "gpt2": dict(family="decoder", vocab_size=50257, hidden_size=768, num_heads=12,
                 decoder_layers=12, intermediate_size=3072, activation="gelu_tanh",
                 max_positions=1024, head="lm", pad_id=None, bos_id=50256, eos_id=50256,
                 activation_dropout=0.0),
    "llama-small": dict(family="decoder", vocab_size=32000, hidden_size=768, num_heads=12,
                        num_kv_heads=4, decoder_layers=12, intermediate_size=2048,
                        activation="silu", gated_mlp=True, norm="rmsnorm", norm_eps=1e-6,
                        position="rotary", attention_bias=False, mlp_bias=False,
                        tie_embeddings=False, max_positions=2048, head="lm", pad_id=None,
                        bos_id=1, eos_id=2),
    "bart-base": dict(family="encoder-decoder", vocab_size=50265, hidden_size=768, num_heads=12,
                      encoder_layers=6, decoder_layers=6, intermediate_size=3072,
                      norm_position="post", embed_norm=True, final_norm=False,
                      max_positions=1024, position_offset=2, lm_head_bias=True, head="lm",
                      pad_id=1, bos_id=0, eos_id=2, decoder_start_id=2),
    "t5-small": dict(family="encoder-decoder", vocab_size=32128, hidden_size=512, num_heads=8,
                     head_dim=64, encoder_layers=6, decoder_layers=6, intermediate_size=2048,
                     activation="relu", norm="rmsnorm", norm_eps=1e-6, position="relative",
                     attention_bias=False, mlp_bias=False, scale_attention=False,
                     max_positions=512, output_scale=512 ** -0.5, head="lm", pad_id=0,
                     eos_id=1, decoder_start_id=0),
    "transformer-base": dict(family="encoder-decoder", vocab_size=37000, hidden_size=512,
                             num_heads=8, encoder_layers=6, decoder_layers=6,
                             intermediate_size=2048, activation="relu", norm_position="post",
                             final_norm=False, position="sinusoidal", scale_embeddings=True,
                             dropout=0.1, max_positions=1024, head="lm", pad_id=0, bos_id=1,
                             eos_id=2, decoder_start_id=1),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named architecture, optionally with fields changed: `preset("gpt2", decoder_layers=6)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})

