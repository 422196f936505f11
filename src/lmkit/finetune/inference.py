"""Using a fine-tuned folder: `pipeline` (a ready-to-call predictor), `predict` and
`evaluate_run`. The folder's task.json (written by `finetune`) names the task and its
options; without one the task is inferred from the model's head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmkit.loading import load, locate
from lmkit.model import Model
from lmkit.tasks import TASKS, Task
from lmkit.textfiles import read_json

TASK_FILE = "task.json"


def _run_task(run_dir: str | Path, task_name: str | None = None, device: str = "auto",
              dtype: str | torch.dtype | None = "auto", **options: Any) -> tuple[Model, Task]:
    run_dir = locate(run_dir).path  # a folder, or a registry / HF cache name
    model = load(run_dir, dtype=dtype, device=device)
    info = read_json(run_dir / TASK_FILE, "task file") if (run_dir / TASK_FILE).exists() \
        else {}
    name = task_name or info.get("task") or _task_for(model)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    stored = {k: v for k, v in info.get("options", {}).items()
              if k in TASKS[name].option_names()}  # for another task, or from older runs
    task = TASKS[name](model.tokenizer, model.config, **{**stored, **options})
    if task.head != model.config.head:
        raise ValueError(f"{run_dir} has a {model.config.head!r} head but the {name} task "
                         f"needs {task.head!r}: fine-tune it for {name} first")
    return model, task  # loaded in eval mode


def _task_for(model: Model) -> str:
    head, family = model.config.head, model.config.family
    return {"classification": "classification", "token-classification": "ner",
            "mlm": "fill-mask"}.get(head, "translation" if family == "encoder-decoder"
                                    else "generation")


def evaluate_run(run_dir: str | Path, data: str | Path, limit: int | None = None,
                 batch_size: int = 32, *, device: str = "auto",
                 dtype: str | torch.dtype | None = "auto", **options: Any) -> dict[str, float]:
    """Score a fine-tuned folder on labelled data (any `lmkit.sources` source) with its
    task's metric (`device` and `dtype` as `lmkit.load` takes them; `options`, e.g.
    label_column, override the task options stored in task.json)."""
    model, task = _run_task(run_dir, device=device, dtype=dtype, **options)
    examples = task.read(data, label_names=model.config.label_names or None, limit=limit)
    return task.evaluate(model, examples, batch_size)


class Pipeline:
    """`pipeline(text)` or `pipeline([texts])`: the task's predictions (with scores)."""

    def __init__(self, model: Model, task: Task):
        self.model, self.task = model, task

    def __call__(self, inputs: Any, batch_size: int = 32) -> Any:
        single = isinstance(inputs, (str, tuple))
        out = self.task.predict(self.model, [inputs] if single else list(inputs), batch_size)
        return out[0] if single else out


def pipeline(task: str | None, path: str | Path, *, device: str = "auto",
             dtype: str | torch.dtype | None = "auto", **options: Any) -> Pipeline:
    """A ready-to-call predictor: `lmkit.pipeline("ner", "runs/ner")("Ada lives in Paris")`.
    `path` is a folder or a model name (``owner/name[@rev]``: registry, then the Hugging Face
    cache; see `lmkit.loading.locate`). `task` may be None to use the folder's own
    (task.json, or inferred from its head).
    `device` / `dtype`: where and in which format to hold the weights (see `lmkit.load`;
    "auto": the GPU if there is one, the stored dtype where it is native, else fp32)."""
    return Pipeline(*_run_task(path, task, device, dtype, **options))


def predict(run_dir: str | Path, inputs: list[Any], task: str | None = None, *,
            device: str = "auto", dtype: str | torch.dtype | None = "auto",
            **options: Any) -> list:
    """The predictions of a fine-tuned folder for `inputs` (see `pipeline`)."""
    return pipeline(task, run_dir, device=device, dtype=dtype, **options)(inputs)
