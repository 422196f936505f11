"""The Transformer: attention, layers, blocks and stacks, task heads."""

from lmkit.model.attention import KVCache
from lmkit.model.transformer import Model, ModelOutput, build, eval_mode

__all__ = ["KVCache", "Model", "ModelOutput", "build", "eval_mode"]
