"""Hugging Face checkpoint folders: the machinery every model family shares.

A family module (hf_bert, hf_gpt2, hf_llama, hf_bart, hf_t5) describes each of its HF
`model_type`s with a `Spec`: config translation both ways, a table of tensor names, and the few
tensor transforms the format needs. This module does the rest once: read a folder (single or
sharded safetensors, or a pickle only when allowed), build the model through
`lmkit.model.build` (meta device + adopt, so weights are in memory once), and write a folder
that `transformers` loads. Applying a table is `lmkit.convert.tables`.

HF names in the tables are written without the base-model prefix ("bert.", "model.",
"transformer."); it is stripped on reading and added on writing for head models.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmkit.checkpoint import (
    CONFIG,
    DTYPES,
    atomic_folder,
    check_layers,
    read_pickle,
    read_tensors,
    refuse_int8,
)
from lmkit.config import HEADS, ModelConfig, eos_tuple
from lmkit.convert.tables import (
    Table,
    Tensors,
    expand,
    layer_names,
    to_foreign_names,
    to_lmkit_names,
)
from lmkit.errors import CheckpointError, ConfigError, reading
from lmkit.generation_config import GENERATION_CONFIG, GenerationConfig
from lmkit.model import Model, build
from lmkit.textfiles import read_json
from lmkit.tokenizer import Tokenizer

log = logging.getLogger("lmkit")

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
FAMILY_MODULES = ("hf_bert", "hf_gpt2", "hf_llama", "hf_bart", "hf_t5", "hf_modernbert",
                  "hf_decoders")


@dataclass(frozen=True)
class Spec:
    """How one Hugging Face `model_type` maps onto lmkit."""

    model_type: str
    architectures: dict[str, str]  # lmkit head -> HF class written on export (and read)
    prefix: str  # base-model prefix of body tensors in head models ("bert.")
    head_modules: tuple[str, ...]  # top-level HF modules outside the base model
    config_from_hf: Callable[[dict[str, Any], set[str]], dict[str, Any]]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    table: Callable[[ModelConfig], Table]
    ignore: tuple[str, ...] = ()  # regexes: HF tensors read and dropped (buffers, unused parts)
    # regexes: HF tensors lmkit does not compute with but keeps (`Model.hf_carried`) and
    # writes back on export (BERT's pooler, its next-sentence head)
    carry: tuple[str, ...] = ()
    from_hf: Callable[[Tensors, ModelConfig], Tensors] | None = None  # transforms, HF names
    to_hf: Callable[[Tensors, ModelConfig], Tensors] | None = None
    read_aliases: dict[str, str] = field(default_factory=dict)  # more HF classes -> head
    # lmkit head -> HF class of the type's encoder-only variant (T5EncoderModel)
    encoder_architectures: dict[str, str] = field(default_factory=dict)

    def architecture(self, cfg: ModelConfig) -> str | None:
        """The HF class that holds `cfg` (its head, and its family where the type has an
        encoder-only variant), or None when this type has none."""
        variant = self.encoder_architectures and cfg.family == "encoder"
        return (self.encoder_architectures if variant else self.architectures).get(cfg.head)


def registry() -> dict[str, Spec]:
    """Supported HF model types, in the order tried when exporting."""
    specs: dict[str, Spec] = {}
    for name in FAMILY_MODULES:
        module = importlib.import_module(f"lmkit.convert.{name}")
        specs.update({s.model_type: s for s in module.SPECS})
    return specs


# ---- shared helpers for family modules -------------------------------------------------------
ACTIVATIONS_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                       "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu",
                       "swish": "silu"}
ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


def activation_from_hf(name: str) -> str:
    """lmkit's name for an HF activation function, or a ValueError naming the supported ones."""
    if name not in ACTIVATIONS_FROM_HF:
        raise ValueError(f"activation {name!r} is not supported; lmkit reads "
                         f"{sorted(ACTIVATIONS_FROM_HF)}")
    return ACTIVATIONS_FROM_HF[name]


def common_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Config keys every HF model has: special ids, label names, dtype."""
    out: dict[str, Any] = {"pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id,
                           "eos_token_id": cfg.eos_id, "dtype": cfg.dtype}
    if cfg.label_names:
        out["id2label"] = {str(i): name for i, name in enumerate(cfg.label_names)}
        out["label2id"] = {name: i for i, name in enumerate(cfg.label_names)}
    return out


def common_from_hf(hf: dict[str, Any], pad: int | None = None, bos: int | None = None,
                   eos: int | None = None) -> dict[str, Any]:
    """Special ids (the HF class defaults when a key is absent) and the stored dtype."""
    dtype = hf.get("dtype") or hf.get("torch_dtype")
    ids = {"pad_id": first_id(hf.get("pad_token_id", pad)),
           "bos_id": first_id(hf.get("bos_token_id", bos)),
           "eos_id": hf.get("eos_token_id", eos)}  # one id or a list (Llama 3): kept as is
    vocab = hf.get("vocab_size")
    for role, value in ids.items():  # an id the embedding lacks can be neither read nor produced
        if not isinstance(vocab, int) or not all(isinstance(i, int) for i in eos_tuple(value)):
            continue
        outside = [i for i in eos_tuple(value) if not 0 <= i < vocab]
        if outside:
            log.info("%s %s is outside the vocabulary of %d tokens: the model has none",
                     role, outside, vocab)
            kept = [i for i in eos_tuple(value) if 0 <= i < vocab]
            ids[role] = kept if isinstance(value, list) and kept else None
    return {**ids, "dtype": dtype if dtype in DTYPES else "float32"}


def first_id(value: Any) -> int | None:
    """The first of a list of ids (pad and bos are one id in lmkit), or the id itself."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _label_names(hf: dict[str, Any]) -> list[str]:
    id2label = hf.get("id2label")
    if id2label:
        return [id2label[k] for k in sorted(id2label, key=int)]
    return [f"LABEL_{i}" for i in range(hf.get("num_labels", 2))]


# ---- reading ------------------------------------------------------------------------------------
def read_weights(path: Path, allow_pickle: bool = False) -> Tensors:
    """All tensors of an HF folder: model.safetensors, a sharded safetensors set, or (only with
    `allow_pickle`) pytorch_model.bin, read with `weights_only=True`. Every file read must lie
    inside the folder; an index may name only shards of its own format."""
    if (path / SAFETENSORS).exists():
        return _read_file(path, SAFETENSORS, allow_pickle)
    for index_name, suffix in ((SAFETENSORS_INDEX, ".safetensors"), (PICKLE_INDEX, ".bin")):
        if (path / index_name).exists():
            weight_map = read_json(path / index_name, "weights index",
                                   CheckpointError).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{path / index_name} has no weight_map of tensor names "
                                      "to shard files: the index is damaged")
            tensors: Tensors = {}
            for shard in sorted(set(weight_map.values())):
                if not shard.endswith(suffix):
                    raise CheckpointError(f"{path / index_name} names {shard!r}, which is not a "
                                          f"{suffix} shard: the index is damaged or hostile")
                tensors.update(_read_file(path, shard, allow_pickle))
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise CheckpointError(f"{path / index_name} lists tensors its shards lack: "
                                      f"{missing[:10]}; the download is incomplete")
            return tensors
    if (path / PICKLE).exists():
        return _read_file(path, PICKLE, allow_pickle)
    raise CheckpointError(f"{path} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} "
                          f"or {PICKLE}")


def inside(folder: Path, name: str) -> Path:
    """`folder / name` when it is a file inside `folder`: `name` is a plain relative path (no
    `..`, not absolute) and no symbolic link leads out of the folder, except those of a
    Hugging Face cache snapshot into its repository's blobs/ folder."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise CheckpointError(f"{folder}: the weights file name {name!r} leads outside the "
                              "folder; an index may name only files inside it")
    file, root = folder / name, folder.resolve()
    real = file.resolve()
    cache = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if not (real.is_relative_to(root) or (cache is not None and real.is_relative_to(cache))):
        raise CheckpointError(f"{file} is a link to {real}, outside {folder}: lmkit reads only "
                              "files inside the checkpoint folder (copy them in if you trust "
                              "the link)")
    if not real.is_file():
        raise CheckpointError(f"{file} does not exist or is not a file: the download is "
                              "incomplete")
    return file


def _read_file(folder: Path, name: str, allow_pickle: bool) -> Tensors:
    """One weights file of a folder: safetensors, or a pickle if `allow_pickle`."""
    file = inside(folder, name)
    if file.suffix == ".safetensors":
        return read_tensors(file)[0]
    tensors = read_pickle(file, allow_pickle)
    if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise CheckpointError(f"{file} does not hold a mapping of tensor names to tensors")
    return tensors


def _spec_for(model_type: Any) -> Spec:
    specs = registry()
    if not isinstance(model_type, str) or model_type not in specs:
        raise CheckpointError(f"Hugging Face model_type {model_type!r} is not supported; "
                              f"lmkit converts: {', '.join(sorted(specs))}")
    return specs[model_type]


def _head_of(spec: Spec, hf: dict[str, Any], names: set[str], cfg: ModelConfig) -> str:
    archs = hf.get("architectures") or []
    known = {**{v: k for k, v in spec.architectures.items()},
             **{v: k for k, v in spec.encoder_architectures.items()}, **spec.read_aliases}
    if archs:
        if archs[0] not in known:
            raise CheckpointError(f"{archs[0]} is not supported; for model_type "
                                  f"{spec.model_type!r} lmkit reads: {', '.join(sorted(known))}")
        return known[archs[0]]
    # No architectures field: the first head whose tensors are all in the file (a tied LM
    # head needs none), else the bare body.
    for head in spec.architectures:
        if head == "none" or HEADS[head].needs_label_names:  # their labels say nothing here
            continue
        if spec.architecture(cfg.replace(head=head)) is None:  # not in this variant
            continue
        headed = cfg.replace(head=head)
        entries = expand(spec.table(headed), headed)
        wanted = [alts for lm, alts in entries.items() if lm.startswith("head.")
                  and not (lm == "head.proj.weight" and headed.tied_output)]
        if all(any(a in names or any(n.startswith(a + ".") for n in names) for a in alts)
               for alts in wanted):
            return head
    return "none"


def strip_prefix(tensors: Tensors, prefix: str) -> Tensors:
    if not prefix:
        return tensors
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}


def config_from_hf(raw: dict[str, Any], names: set[str] | None = None) -> ModelConfig:
    """The ModelConfig of an HF config.json dict (its task head from `architectures`)."""
    spec = _spec_for(raw.get("model_type"))
    try:
        fields = spec.config_from_hf(raw, names or set())
        cfg = ModelConfig(**fields, head="none")
        if names is not None:  # before anything is expanded per layer
            body = {n.removeprefix(spec.prefix) if spec.prefix else n for n in names}
            check_layers(cfg, body, f"this {spec.model_type} checkpoint", layer_names(
                spec.table(cfg)))
        head = _head_of(spec, raw, names or set(), cfg)
        names = _label_names(raw) if HEADS[head].needs_label_names else []
        return cfg.replace(head=head, label_names=names)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, ZeroDivisionError, AttributeError) as e:
        what = f"field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"this {spec.model_type} config cannot be expressed in lmkit: "
                              f"{what}") from None


def retarget(cfg: ModelConfig, head: str | None,
             label_names: list[str] | None) -> ModelConfig:
    """The config with a different task head, or the same config when none is asked for."""
    if head is None or (head == cfg.head and (not label_names or
                                              label_names == cfg.label_names)):
        return cfg
    return cfg.replace(head=head, label_names=list(label_names or cfg.label_names))


def new_head_parts(cfg: ModelConfig, tensors: Tensors) -> tuple[str, ...]:
    """Prefixes of head submodules with any tensor missing: they are initialised fresh, and
    what the checkpoint has for them is dropped (e.g. keep BERT's pooler as the classifier's
    dense layer, initialise only the new output projection)."""
    with torch.device("meta"):
        head = Model(cfg).head
    if head is None:
        return ()
    tied = cfg.tied_output
    parts = []
    for sub, module in head.named_children():
        shapes = {f"head.{sub}.{p}": t.shape for p, t in module.named_parameters()}
        if tied and sub == "proj":
            shapes.pop("head.proj.weight", None)
        if shapes and not all(n in tensors and tensors[n].shape == s for n, s in shapes.items()):
            parts.append(f"head.{sub}.")  # missing, or sized for other labels
    return tuple(parts)


def load_hf(path: str | Path, *, head: str | None = None,
            label_names: list[str] | None = None,
            dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
            allow_pickle: bool = False) -> Model:
    """Load a Hugging Face checkpoint folder (config.json + weights, and its tokenizer when it
    has one) as an lmkit Model in eval mode, as `from_pretrained` returns it.

    `head` / `label_names` put a new task head on the body (see `lmkit.load`)."""
    path = Path(path)
    raw = read_json(path / CONFIG)
    spec = _spec_for(raw.get("model_type"))
    tensors = strip_prefix(read_weights(path, allow_pickle), spec.prefix)
    with reading(path / CONFIG, ConfigError, f"{spec.model_type} config", "a field is "
                 "missing or has the wrong type: fix it or download the file again"):
        source = config_from_hf(raw, set(tensors))
    cfg = retarget(source, head, label_names)
    if spec.from_hf is not None:
        tensors = spec.from_hf(tensors, cfg)
    table = expand(spec.table(cfg), cfg)
    ignore = spec.ignore + spec.carry
    if cfg is not source:  # the checkpoint's own head has no place in the new model
        ignore += tuple(re.escape(m) + r"\..*|" + re.escape(m) for m in spec.head_modules)
    carried = _carried(tensors, spec, table) if cfg is source else {}
    mapped = to_lmkit_names(tensors, table, ignore,
                            cfg.tied_output)
    del tensors
    new: tuple[str, ...] = ()
    if cfg is not source:
        new = new_head_parts(cfg, mapped)
        mapped = {k: v for k, v in mapped.items() if not k.startswith(new or ("\0",))}
    try:
        model = build(cfg, mapped, new=new, dtype=dtype, device=device)
    except CheckpointError as e:
        hints = [f"{lm} <- {' or '.join(alts)}" for lm, alts in table.items()
                 if lm in str(e)][:10]
        hint = ("\nHugging Face names of the lmkit tensors above:\n  " + "\n  ".join(hints)
                if hints else "")
        raise CheckpointError(f"{path} ({spec.model_type}): {e}{hint}") from None
    model.tokenizer = attach_tokenizer(path, cfg)
    model.generation_config = read_generation_config(path, raw)
    model.hf_model_type = spec.model_type  # save_hf writes the same type back by default
    model.hf_carried = {k: v.to(model.tokens.weight.dtype) for k, v in carried.items()}
    model.hf_architecture = (raw.get("architectures") or [None])[0] if carried else None
    return model.eval()


def _carried(tensors: Tensors, spec: Spec, table: dict[str, tuple[str, ...]]) -> Tensors:
    """The tensors `spec.carry` keeps that the table does not map (BERT's pooler is its
    classifier's dense layer, say, and mapped there)."""
    known = {alt for alts in table.values() for alt in alts}
    return {k: v for k, v in tensors.items() if any(re.fullmatch(p, k) for p in spec.carry)
            and k not in known and k.rpartition(".")[0] not in known}


def read_generation_config(path: Path, raw: dict[str, Any]) -> GenerationConfig | None:
    """The folder's generation_config.json, else the generation keys of its config.json (as
    transformers falls back to); one warning names the settings lmkit does not apply."""
    file = path / GENERATION_CONFIG
    gen = (GenerationConfig.from_file(file) if file.is_file()
           else GenerationConfig.from_model_config(raw))
    ignored = gen.ignored() if gen is not None else []
    if ignored:
        log.warning("%s: generation settings lmkit does not apply (kept for export): %s",
                    path, ", ".join(ignored))
    return gen


def attach_tokenizer(path: Path, cfg: ModelConfig) -> Any:
    """The folder's tokenizer (tokenizer.json or vocab/merges files), or None if it has none.
    A tokenizer with more ids than the embedding has rows is an error: those ids would crash
    the model (or silently read another token's row)."""
    try:
        tok = Tokenizer.from_dir(path)
    except FileNotFoundError:
        log.info("%s has no tokenizer lmkit can read (tokenizer.json, vocab.json + merges.txt, "
                 "vocab.txt); loading the model without one", path)
        return None
    # Padding / truncation stored in tokenizer.json are settings of whoever trained it
    # (all-MiniLM pads every text to 128); transformers ignores them unless asked, and lmkit
    # pads batches itself, so encode() must return just the text's ids.
    tok.backend.no_padding()
    tok.backend.no_truncation()
    check_vocab(tok, cfg, path)
    return tok


def check_vocab(tok: Any, cfg: ModelConfig, where: Any) -> None:
    """Raise CheckpointError when the tokenizer has ids the embedding does not."""
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"the tokenizer of {where} has {tok.vocab_size} tokens but the model's embedding "
            f"has only {cfg.vocab_size} rows: the tokenizer does not belong to these weights "
            "(or tokens were added without resizing the embeddings); use the matching "
            "tokenizer or resize the model's vocabulary")


# ---- writing ------------------------------------------------------------------------------------
_IRRELEVANT = ("dropout", "attention_dropout", "activation_dropout")


def _canonical(cfg: ModelConfig) -> dict[str, Any]:
    """Config fields that change what the model computes, irrelevant ones set to defaults, so
    two configs of the same function compare equal."""
    d = cfg.to_dict()
    defaults = {f.name: (f.default if f.default_factory is dataclasses.MISSING
                         else f.default_factory()) for f in dataclasses.fields(ModelConfig)}
    drop = set(_IRRELEVANT)
    if cfg.position != "rotary":
        drop |= {"rope_theta", "rotary_fraction", "rope_scaling"}
    if cfg.position != "relative":
        drop |= {"relative_buckets", "relative_max_distance"}
    else:
        drop |= {"max_positions"}  # relative positions have no table and no length limit
    if not cfg.head_spec.pooled:
        drop |= {"pooling", "classifier_hidden", "classifier_activation", "classifier_norm",
                 "classifier_bias"}
    if cfg.head != "mlm":
        drop |= {"mlm_transform"}
    if not ((cfg.head_spec.pooled and cfg.classifier_hidden) or
            (cfg.head == "mlm" and cfg.mlm_transform)):
        drop |= {"head_dense_bias"}  # no head has a dense layer
    if cfg.head != "lm":
        drop |= {"lm_head_bias", "output_scale"}
    if cfg.head not in ("lm", "mlm"):
        drop |= {"tie_embeddings"}
    if cfg.family != "encoder-decoder":
        drop |= {"decoder_start_id"}
    for name in drop:
        d[name] = defaults[name]
    d["num_kv_heads"], d["head_dim"] = cfg.kv_heads, cfg.dim_per_head  # None = the default
    # Local attention written out per block ([] and a window = all local; no window = global)
    kinds = [cfg.layer_type(i) for i in range(cfg.encoder_layers + cfg.decoder_layers)]
    local = "local" in kinds
    d["layer_types"], d["window"] = (kinds, cfg.window) if local else ([], None)
    d["local_rope_theta"] = (cfg.local_rope_theta or cfg.rope_theta
                             if local and cfg.position == "rotary" else None)
    d["attention_out_bias"] = cfg.out_bias
    return d


def _differences(cfg: ModelConfig, spec: Spec, names: set[str]) -> dict[str, tuple[Any, Any]]:
    """Fields that would change on a round trip through `spec` (empty: exactly expressible)."""
    try:
        hf = spec.config_to_hf(cfg)
        back = config_from_hf({**hf, "model_type": spec.model_type,
                               "architectures": [spec.architecture(cfg)]}, names)
    except (ValueError, KeyError) as e:
        return {"(config)": (str(e), None)}
    a, b = _canonical(cfg), _canonical(back)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def _hf_tensors(model: Model, spec: Spec) -> Tensors:
    tied = model.tied_names()
    state = {k: v.detach() for k, v in model.state_dict().items() if k not in tied}
    carried = None
    if getattr(model, "hf_model_type", None) == spec.model_type:  # written back as read
        dtype = model.tokens.weight.dtype
        carried = {k: v.to(dtype) for k, v in getattr(model, "hf_carried", {}).items()}
    return {k: v.contiguous()
            for k, v in hf_state(state, model.config, spec, carried=carried).items()}


def hf_state(tensors: Tensors, cfg: ModelConfig, spec: Spec, transform: bool = True,
             carried: Tensors | None = None) -> Tensors:
    """lmkit tensors under their names in the transformers model of `cfg.head` (the base-model
    prefix added for a head model); `transform`: also the family's fusing / transposing;
    `carried`: HF tensors kept from the source (a Spec's `carry`), added as they are."""
    tensors = to_foreign_names(tensors, expand(spec.table(cfg), cfg))
    if transform and spec.to_hf is not None:
        tensors = spec.to_hf(tensors, cfg)
    tensors.update(carried or {})
    if cfg.head != "none" and spec.prefix:
        tensors = {(k if k.split(".")[0] in spec.head_modules else spec.prefix + k): v
                   for k, v in tensors.items()}
    return tensors


def choose_spec(cfg: ModelConfig, model_type: str | None = None,
                preferred: str | None = None) -> Spec:
    """The HF model type that expresses `cfg` exactly: `model_type` if given, else the first
    that fits, trying `preferred` first."""
    specs = registry()
    if model_type is not None:
        candidates = [_spec_for(model_type)]
    else:
        candidates = list(specs.values())
        if preferred in specs:  # the type the model was imported from, when it still fits
            candidates.insert(0, specs[preferred])
    report = {}
    for spec in candidates:
        if spec.architecture(cfg) is None:
            report[spec.model_type] = {"head": (cfg.head, sorted(spec.architectures))}
            continue
        try:
            with torch.device("meta"):
                names = set(_hf_tensors(Model(cfg), spec))
        except CheckpointError as e:  # a tensor this family has no place for
            report[spec.model_type] = {"tensors": (str(e), None)}
            continue
        diff = _differences(cfg, spec, names)
        if not diff:
            return spec
        report[spec.model_type] = diff
    # Closest: a family with the right head and tensors, differing in the fewest fields.
    closest = min(report, key=lambda k: (bool({"head", "tensors", "(config)"} & set(report[k])),
                                         len(report[k])))
    detail = ", ".join(f"{k}={v[0]!r} (HF {closest} gives {v[1]!r})"
                       for k, v in report[closest].items())
    raise CheckpointError(
        f"this model cannot be written as a Hugging Face checkpoint of type "
        f"{model_type or 'any supported type'} without changing what it computes; closest is "
        f"{closest}, which differs in: {detail}")


def save_hf(model: Model, path: str | Path, tokenizer: Any = None,
            model_type: str | None = None) -> Path:
    """Write `model` as a Hugging Face folder (config.json + model.safetensors, and the
    tokenizer) that `transformers.AutoModel*.from_pretrained` loads with the same outputs.

    `model_type` picks the HF family; by default the one the model was imported from, else
    the first that expresses the config exactly. Written atomically (a temporary folder
    renamed into place)."""
    refuse_int8(model)
    path = Path(path)
    cfg = model.config
    spec = choose_spec(cfg, model_type, getattr(model, "hf_model_type", None))
    tensors = {k: v.cpu() for k, v in _hf_tensors(model, spec).items()}
    architecture = spec.architecture(cfg)
    if getattr(model, "hf_carried", None) and model.hf_model_type == spec.model_type:
        architecture = model.hf_architecture or architecture  # BertForPreTraining keeps NSP
    hf = {"architectures": [architecture], "model_type": spec.model_type,
          **spec.config_to_hf(cfg)}
    stored = {v: k for k, v in DTYPES.items()}.get(model.tokens.weight.dtype)
    hf["dtype"] = stored or hf["dtype"]  # what the file holds (load(dtype=...) may differ)
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    with atomic_folder(path) as staging:
        save_file(tensors, staging / SAFETENSORS, metadata={"format": "pt"})
        (staging / CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(staging)
        if model.generation_config is not None:
            model.generation_config.save(staging)
    return path
