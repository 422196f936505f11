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

from lmkit.checkpoint import save
from lmkit.config import PRESETS, ModelConfig, preset
from lmkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    LmkitError,
    StorageError,
    TokenizerError,
)
from lmkit.generate import Generation, generate
from lmkit.hub import pull, push
from lmkit.loading import load
from lmkit.model import Model, ModelOutput

__all__ = ["PRESETS", "CheckpointError", "ConfigError", "DataError", "Generation", "LmkitError",
           "Model", "ModelConfig", "ModelOutput", "StorageError", "TokenizerError", "generate",
           "load", "pipeline", "preset", "pull", "push", "save"]
__version__ = "0.1.0"


def __getattr__(name: str):  # the fine-tuning stack is imported only when it is used
    if name == "pipeline":
        from lmkit.finetune.inference import pipeline

        return pipeline
    raise AttributeError(f"module 'lmkit' has no attribute {name!r}")
