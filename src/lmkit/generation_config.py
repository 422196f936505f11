"""Generation settings stored with a checkpoint: `generation_config.json`.

The same file in lmkit folders and Hugging Face folders, with Hugging Face's key names, so
one reader and one writer serve both. `lmkit.generate` takes its defaults from the model's
`generation_config` (explicit arguments win). Keys lmkit's decoding cannot honour are kept in
`other` and written back on export, so a round trip through lmkit loses nothing;
`ignored()` names the ones that would change what transformers generates.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkit.errors import ConfigError
from lmkit.textfiles import read_json

GENERATION_CONFIG = "generation_config.json"
# The keys lmkit applies, by type (None = not set: generate's own default applies).
_INTS = ("max_new_tokens", "max_length", "top_k", "num_beams", "num_return_sequences",
         "no_repeat_ngram_size", "forced_bos_token_id", "forced_eos_token_id", "pad_token_id",
         "bos_token_id", "decoder_start_token_id")
_FLOATS = ("temperature", "top_p", "length_penalty", "repetition_penalty")
_BOOLS = ("do_sample", "early_stopping")
# Other keys whose value here changes nothing transformers generates (their HF defaults, or
# bookkeeping); any other key or value is carried on export but not applied by lmkit.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "min_length": (0,), "min_new_tokens": (None, 0), "num_beam_groups": (1,),
    "diversity_penalty": (0.0,), "typical_p": (1.0,), "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,), "encoder_repetition_penalty": (1.0,), "min_p": (None,),
    "encoder_no_repeat_ngram_size": (0,), "bad_words_ids": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_decoder_ids": (None,), "use_cache": (True,),
    "output_scores": (False,), "output_attentions": (False,), "output_hidden_states": (False,),
    "return_dict_in_generate": (False,), "remove_invalid_values": (False,),
    "renormalize_logits": (False,), "exponential_decay_length_penalty": (None,),
    "sequence_bias": (None,), "guidance_scale": (None,), "max_time": (None,),
}
_BOOKKEEPING = ("transformers_version", "_from_model_config")
# config.json keys that older checkpoints (and transformers without generation_config.json)
# read generation settings from.
_IDS = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id")
LEGACY_KEYS = _INTS + _FLOATS + _BOOLS + ("eos_token_id",) + tuple(_NEUTRAL)


@dataclass
class GenerationConfig:
    """Defaults for `lmkit.generate` that belong to a checkpoint (HF key names).

    `eos_token_id` is a list: generation stops at any of its ids (Llama 3's end of text and
    end of turn, say). `other` holds keys lmkit does not apply, written back unchanged."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new tokens (decoder-only) / decoder tokens
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | None = None
    num_return_sequences: int | None = None
    no_repeat_ngram_size: int | None = None
    repetition_penalty: float | None = None
    forced_bos_token_id: int | None = None  # the first generated token
    forced_eos_token_id: int | None = None  # the last token at the length limit
    eos_token_id: list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    other: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Any = GENERATION_CONFIG) -> GenerationConfig:
        """Read HF-style keys; a value of the wrong type is a ConfigError naming `where`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object of generation settings")
        out = cls()
        for key, value in data.items():
            if key == "eos_token_id":
                value = [value] if _is_int(value) else value
                if value is not None and not (isinstance(value, list)
                                              and all(map(_is_int, value))):
                    raise ConfigError(f"{where}: eos_token_id={value!r} must be a token id or "
                                      "a list of ids")
                out.eos_token_id = value or None
            elif key in _INTS + _FLOATS + _BOOLS:
                if key == "forced_eos_token_id" and isinstance(value, list) and len(value) == 1:
                    value = value[0]
                if key == "early_stopping" and value == "never":  # HF's third option
                    out.other[key] = value
                    continue
                ok = (value is None or (_is_int(value) if key in _INTS else
                                        isinstance(value, bool) if key in _BOOLS else
                                        _is_int(value) or isinstance(value, float)
                                        and math.isfinite(value)))
                if not ok:
                    raise ConfigError(f"{where}: {key}={value!r} has the wrong type; fix the "
                                      "file")
                setattr(out, key, float(value) if key in _FLOATS and value is not None
                        else value)
            else:
                out.other[key] = value
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> GenerationConfig:
        return cls.from_dict(read_json(path, "generation config", ConfigError), path)

    @classmethod
    def from_model_config(cls, hf: dict[str, Any]) -> GenerationConfig | None:
        """The generation keys of an HF config.json (how older checkpoints store them, and
        what transformers falls back to without generation_config.json); None when it has
        none beyond the special ids (the ModelConfig holds those)."""
        settings = {k: hf[k] for k in LEGACY_KEYS if k in hf and hf[k] not in
                    _NEUTRAL.get(k, ())}
        if not set(settings) - set(_IDS):  # the model config's special ids say it all
            return None
        return cls.from_dict(settings, "config.json")

    def to_dict(self) -> dict[str, Any]:
        """HF-style keys: the ones set, then the carried ones."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "other" and getattr(self, f.name) is not None}
        return {**out, **self.other}

    def save(self, folder: str | Path) -> Path:
        file = Path(folder) / GENERATION_CONFIG
        file.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return file

    def ignored(self) -> list[str]:
        """`key=value` of the carried settings that change what transformers generates but
        lmkit does not apply."""
        return [f"{k}={json.dumps(v)}" for k, v in self.other.items()
                if k not in _BOOKKEEPING and v not in _NEUTRAL.get(k, ())]

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
