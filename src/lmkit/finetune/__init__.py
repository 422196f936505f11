"""Transfer learning: fine-tuning schemes (full, frozen body, top-k, LoRA), the fine-tuning
runner, and pipelines over fine-tuned folders."""

from lmkit.finetune.inference import Pipeline, evaluate_run, pipeline, predict
from lmkit.finetune.run import FinetuneConfig, FinetuneResult, finetune, resume
from lmkit.finetune.schemes import SCHEMES, apply_scheme
from lmkit.model.lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter
from lmkit.train.optim import lr_scales

__all__ = ["SCHEMES", "FinetuneConfig", "FinetuneResult", "LoRAConfig", "Pipeline",
           "apply_lora", "apply_scheme", "evaluate_run", "finetune", "load_adapter",
           "lr_scales", "merge_lora", "pipeline", "predict", "resume", "save_adapter"]
