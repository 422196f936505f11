"""lmkit: the whole life of a Transformer model.

    import lmkit
    model = lmkit.Model(lmkit.preset("tiny-decoder"))    # an architecture
    model.save("ckpt")                                     # a checkpoint folder
    model = lmkit.load("ckpt")                             # ... or a Hugging Face folder
    lmkit.generate(model, [[1, 5, 7]], max_new_tokens=10)
"""

from lmkit.checkpoint import CheckpointError, load, save
from lmkit.config import PRESETS, ModelConfig, preset
from lmkit.generate import Generation, generate
from lmkit.model import Model, ModelOutput

__all__ = [
           "PRESETS",
           "CheckpointError",
           "Generation",
           "Model",
           "ModelConfig",
           "ModelOutput",
           "generate",
           "load",
           "preset",
           "save",
]
__version__ = "0.1.0"
