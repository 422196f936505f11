"""LoRA adapters in PEFT's layout, both ways, for the Hugging Face families.

A PEFT adapter folder is `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
task_type, base_model_name_or_path, modules_to_save) and `adapter_model.safetensors`, whose
tensors are named after the transformers model PEFT wraps:
`base_model.model.<HF module>.lora_A.weight` / `.lora_B.weight`, plus the whole tensors of
`modules_to_save` (a trained task head) as `base_model.model.<HF tensor>`. lmkit's LoRALinear
holds the same matrices (`lora_a` = A, `lora_b` = B, scaling alpha / r), so export and import
are renames through the family's tensor-name table (`lmkit.convert.hf`): no numbers change.

    save_peft(model, "adapter")       # PeftModel.from_pretrained(hf_model, "adapter")
    load_peft(model, "adapter")       # a PEFT adapter onto an lmkit model of its base
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmkit.checkpoint import atomic_folder, read_tensors
from lmkit.config import ModelConfig
from lmkit.convert.hf import Spec, choose_spec, hf_state, strip_prefix
from lmkit.convert.tables import Tensors, expand, to_lmkit_names
from lmkit.errors import CheckpointError
from lmkit.model import Model
from lmkit.model.lora import LoRAConfig, LoRALinear, apply_lora
from lmkit.textfiles import read_json

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ROOT = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
# PEFT's task types for lmkit's heads, both ways (an encoder-decoder LM is SEQ_2_SEQ_LM).
TASK_TYPES = {"lm": "CAUSAL_LM", "classification": "SEQ_CLS",
              "token-classification": "TOKEN_CLS", "none": "FEATURE_EXTRACTION"}
HEADS_OF_TASK = {**{v: k for k, v in TASK_TYPES.items()}, "SEQ_2_SEQ_LM": "lm"}
# LoRA variants whose numbers lmkit's LoRALinear does not compute.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None}


def is_peft(path: str | Path) -> bool:
    """True when `path` is a PEFT adapter folder (its config names a peft_type)."""
    file = Path(path) / PEFT_CONFIG
    return file.is_file() and "peft_type" in read_json(file, "adapter config")


def _spec(model: Model) -> tuple[Spec, ModelConfig]:
    """The HF family of the model without its adapters (the one it was read from, else the
    one `lmkit convert` would write)."""
    cfg = model.config.replace(lora=None)
    return choose_spec(cfg, preferred=getattr(model, "hf_model_type", None)), cfg


def _task_type(cfg: ModelConfig) -> str | None:
    if cfg.head == "lm" and cfg.family == "encoder-decoder":
        return "SEQ_2_SEQ_LM"
    return TASK_TYPES.get(cfg.head)  # a masked-LM head has no PEFT task type


def save_peft(model: Model, path: str | Path, base: str | Path = "") -> Path:
    """Write the model's LoRA adapters (and its trained head, as `modules_to_save`) as a PEFT
    adapter folder for the transformers model `lmkit convert` writes from its base. `base`
    becomes `base_model_name_or_path`. Written atomically."""
    if not model.config.lora:
        raise ValueError("the model has no LoRA adapters to export")
    spec, cfg = _spec(model)
    table = expand(spec.table(cfg), cfg)
    with torch.device("meta"):
        exported = set(hf_state(Model(cfg).state_dict(), cfg, spec))
    tensors: Tensors = {}
    modules: set[str] = set()
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        hf = next(iter(hf_state({f"{name}.weight": m.weight}, cfg, spec, transform=False)))
        if hf not in exported:  # e.g. GPT-2's q/k/v, one fused c_attn tensor in HF
            raise CheckpointError(
                f"LoRA on {name} has no module of its own in Hugging Face {spec.model_type} "
                f"({hf.removesuffix('.weight')} is fused with others): PEFT cannot hold it; "
                "choose other lora_targets or merge the adapters (the run folder is merged)")
        module = hf.removesuffix(".weight")
        modules.add(module)
        tensors[f"{ROOT}{module}.lora_A.weight"] = m.lora_a.detach()
        tensors[f"{ROOT}{module}.lora_B.weight"] = m.lora_b.detach()
    # The head is what fine-tuning trained besides the adapters (a tied one is the embedding).
    own = {id(p) for p in model.head_parameters()}
    head = {k: p.detach() for k, p in model.named_parameters() if id(p) in own}
    head_hf = hf_state(head, cfg, spec) if head else {}
    tensors.update({ROOT + k: v for k, v in head_hf.items()})
    lora = LoRAConfig(**model.config.lora)
    config = {
        "peft_type": "LORA", "task_type": _task_type(cfg), "base_model_name_or_path": str(base),
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": _target_names(modules, table, spec.prefix), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "layers_to_transform": None,
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in head_hf}) or None,
        "revision": None,
    }
    with atomic_folder(Path(path)) as staging:
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()},
                  staging / PEFT_WEIGHTS, metadata={"format": "pt"})
        (staging / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def _target_names(modules: set[str], table: dict[str, tuple[str, ...]], prefix: str
                  ) -> list[str]:
    """PEFT's target_modules: the short HF names ("q_proj") when they pick exactly the adapted
    modules among the family's (BERT's "dense" does not), else the full module paths."""
    short = {m.rsplit(".", 1)[-1] for m in modules}
    hits = {alts[0] for alts in table.values() if alts[0].rsplit(".", 1)[-1] in short}
    bare = {m.removeprefix(prefix) for m in modules}
    return sorted(short) if hits == bare else sorted(modules)


def _read(path: Path) -> tuple[dict[str, Any], Tensors]:
    config = read_json(path / PEFT_CONFIG, "adapter config", CheckpointError)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} holds a {config.get('peft_type')} adapter; lmkit reads "
                              "LoRA adapters only")
    for key, plain in _UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, None, {}, False):
            raise CheckpointError(f"{path}: {key}={config[key]!r} is a LoRA variant lmkit does "
                                  f"not compute; only plain LoRA ({key}={plain!r}) is read")
    if not (path / PEFT_WEIGHTS).is_file():
        raise CheckpointError(f"{path} has no {PEFT_WEIGHTS} (lmkit does not read the pickled "
                              "adapter_model.bin: re-save it with safe_serialization=True)")
    tensors, _ = read_tensors(path / PEFT_WEIGHTS)
    return config, tensors


def peft_head(path: str | Path) -> str | None:
    """The lmkit head the adapter was trained with (from its task_type), or None."""
    return HEADS_OF_TASK.get(read_json(Path(path) / PEFT_CONFIG, "adapter config",
                                       CheckpointError).get("task_type"))


def load_peft(model: Model, path: str | Path) -> Model:
    """Put the PEFT LoRA adapter at `path` onto `model` (loaded from its base checkpoint, with
    the head the adapter was trained for); its `modules_to_save` tensors replace the head's."""
    path = Path(path)
    config, stored = _read(path)
    spec, cfg = _spec(model)
    table = expand(spec.table(cfg), cfg)
    lora: dict[str, dict[str, torch.Tensor]] = {}
    whole: Tensors = {}
    for name, t in stored.items():
        hf = name.removeprefix(ROOT)
        for part, field in ((".lora_A.weight", "lora_a"), (".lora_B.weight", "lora_b")):
            if hf.endswith(part):
                lora.setdefault(hf.removesuffix(part) + ".weight", {})[field] = t
                break
        else:
            whole[hf] = t
    names = _lmkit_names(list(lora), spec, table)
    targets = sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in names.values()})
    try:
        apply_lora(model, LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                                     dropout=float(config.get("lora_dropout") or 0.0),
                                     targets=tuple(targets)))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: LoRA on {sorted(lora)[:3]}... does not fit an lmkit "
                              f"{spec.model_type} model ({e})") from None
    state: Tensors = {}
    for hf, lm in names.items():
        module = lm.removesuffix(".weight")
        state.update({f"{module}.{f}": t for f, t in lora[hf].items()})
    whole = strip_prefix(whole, spec.prefix)
    if spec.from_hf is not None:  # HF layouts of head tensors (BART's (1, V) logits bias)
        whole = spec.from_hf(whole, cfg)
    state.update(to_lmkit_names(whole, table, (), False))
    own = model.state_dict()
    missing = sorted(k for k in own if ".lora_" in k and k not in state)
    wrong = sorted(k for k, v in state.items() if k not in own or own[k].shape != v.shape)
    if missing or wrong:
        raise CheckpointError(f"the adapter at {path} does not fit this model: missing "
                              f"{missing[:4]}, unknown or of another shape {wrong[:4]}; load "
                              "the base checkpoint it was trained on (with its task head)")
    model.load_state_dict(state, strict=False)
    return model.eval()


def _lmkit_names(hf_names: list[str], spec: Spec, table: dict[str, tuple[str, ...]]
                 ) -> dict[str, str]:
    """HF tensor names (with the head model's prefix or without) -> lmkit names; a name the
    table does not know is kept, and the caller's shape check reports it."""
    return {name: next(iter(to_lmkit_names(strip_prefix({name: torch.empty(0)}, spec.prefix),
                                           table, (), False)))
            for name in hf_names}
