"""lmkit: the whole life of a Transformer model.

    import lmkit
    model = lmkit.Model(lmkit.preset("tiny-decoder"))    # an architecture
    model.save("ckpt")                                     # a checkpoint folder
    model = lmkit.load("ckpt")                             # ... or a Hugging Face folder
    lmkit.generate(model, [[1, 5, 7]], max_new_tokens=10)
    lmkit.pipeline("ner", "runs/ner")("Ada Lovelace was born in London.")
    lmkit.push("runs/ner", "me/bert-ner"); lmkit.load("me/bert-ner@main")   # sharing

Pretraining is `lmkit.train.pretrain`, fine-tuning `lmkit.finetune.finetune`.
"""

import sys
import types

from lmkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    LmkitError,
    StorageError,
    TokenizerError,
)

__all__ = ["PRESETS", "CheckpointError", "ConfigError", "DataError", "Generation", "LmkitError",
           "Model", "ModelConfig", "ModelOutput", "StorageError", "TokenizerError", "generate",
           "load", "pipeline", "preset", "pull", "push", "save"]
__version__ = "0.1.0"

# The rest is imported when first used, so `import lmkit.cli` (and `lmkit --help`) needs no
# torch: name -> the module that defines it.
_LAZY = {"save": "lmkit.checkpoint", "PRESETS": "lmkit.config", "ModelConfig": "lmkit.config",
         "preset": "lmkit.config", "Generation": "lmkit.generate", "generate": "lmkit.generate",
         "load": "lmkit.loading", "Model": "lmkit.model", "ModelOutput": "lmkit.model",
         "pipeline": "lmkit.finetune.inference", "push": "lmkit.hub", "pull": "lmkit.hub"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'lmkit' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Importing the submodule lmkit.generate binds it here; it must not hide the function.
        if not (name in _LAZY and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
