"""The Transformer: attention, layers, blocks and stacks, task heads."""

from lmkit.model.attention import KVCache
from lmkit.model.transformer import Model, ModelOutput, eval_mode

__all__ = ["KVCache", "Model", "ModelOutput", "eval_mode"]
