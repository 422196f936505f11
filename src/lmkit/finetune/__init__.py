"""Transfer learning: fine-tuning schemes (full, frozen body, top-k, LoRA) and their runner."""

from lmkit.finetune.schemes import SCHEMES, apply_scheme, lr_scales
from lmkit.model.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter

__all__ = ["SCHEMES", "LoRAConfig", "apply_lora", "apply_scheme", "load_adapter", "lr_scales",
           "merge_lora", "save_adapter"]
