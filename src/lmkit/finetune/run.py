"""Fine-tuning: a pretrained checkpoint + a labelled data set -> a task model.

    finetune(checkpoint, FinetuneConfig(task="classification", train=..., dev=..., out=...))

loads the pretrained body with a new task head (saying which tensors are new), applies the
scheme (full, frozen body, top-k, LoRA), trains with the same loop as pretraining on
length-grouped, dynamically padded batches, scores the dev set with the task's metric, and
writes a checkpoint folder with `task.json`, `eval.json`, `compute.json` and a model card
with the run's lineage (`lmkit.lineage`). `evaluate_run`, `predict` and `pipeline`
(`inference.py`) use such a folder. The CLI calls these functions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from lmkit.config import DEFAULT_POOLING, HEADS, POOLINGS
from lmkit.convert.peft import save_peft
from lmkit.data.batches import TaskBatches, collate, length_grouped_batches
from lmkit.errors import CheckpointError, ConfigError
from lmkit.finetune.inference import TASK_FILE
from lmkit.finetune.schemes import SCHEMES, apply_scheme
from lmkit.lineage import (
    PIPELINE_TAGS,
    card_metadata,
    data_record,
    make_record,
    read_card,
    write_card,
)
from lmkit.loading import load, locate
from lmkit.logs import setup_logging
from lmkit.model import Model
from lmkit.model.lora import LoRAConfig, merge_lora, save_adapter
from lmkit.tasks import TASKS, Task
from lmkit.train.distributed import launch_ranks
from lmkit.train.loop import TrainConfig, TrainResult, train
from lmkit.train.metrics import COMPUTE, CURVE, read_metrics
from lmkit.train.options import read_config, read_yaml, save_config
from lmkit.train.state import list_checkpoints
from lmkit.train.trackers import Trackers

log = logging.getLogger("lmkit")
EVAL_FILE, CONFIG_FILE = "eval.json", "finetune_config.yaml"
SMALL_DEV = 50  # fewer dev examples than this: the dev metric is noisy (said once, at start)
# Task options a fine-tuning run may set (None: the task's default, in its Options class);
# they are stored in task.json so evaluate/predict reuse them.
OPTION_FIELDS = ("text_column", "pair_column", "label_column", "label_names", "source_field",
                 "target_field", "max_length", "num_beams", "max_new_tokens")


@dataclass
class FinetuneConfig(TrainConfig):
    """The TrainConfig fields (batch_size, lr, precision, ...) with fine-tuning defaults, plus
    the task, data, scheme and task options. `steps` = 0 means `epochs` over the data."""

    task: str = "classification"
    train: str = ""  # training data: a file, glob, datasets folder or name (lmkit.sources)
    dev: str | None = None  # dev data, scored with the task's metric at the end
    out: str = "runs/finetune"
    steps: int = 0
    epochs: float = 3.0
    batch_size: int = 32
    max_tokens: int | None = None  # batch by a token budget instead of batch_size
    lr: float = 5e-5
    schedule: str = "linear"
    warmup_steps: int = -1  # -1 = 6% of the steps
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    beta2: float = 0.999
    eval_every: int = 0  # steps between dev evaluations: loss + the task's metric (0 = at
    # the end only); needed by patience / best_metric
    save_every: int = 0
    scheme: str = "full"  # full | frozen | top-k | lora
    top_k: int = 1  # blocks trained by the top-k scheme
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"])
    pooling: str | None = None  # classification: first | last | mean | eos (None: family's)
    from_scratch: bool = False  # same architecture, random weights (the baseline)
    train_limit: int | None = None  # use only the first N training examples
    dev_limit: int | None = None
    text_column: str | None = None
    pair_column: str | None = None
    label_column: str | None = None
    label_names: list[str] | None = None  # classes in id order; integer labels index it
    source_field: str | None = None
    target_field: str | None = None
    max_length: int | None = None  # truncate inputs (default: the model's max positions)
    num_beams: int | None = None  # translation / summarization: beam width (task default 4)
    max_new_tokens: int | None = None

    PATH_FIELDS: ClassVar = ("train", "dev", "out")

    def validate(self) -> None:
        """The TrainConfig checks (steps=0 and warmup_steps=-1 mean 'from the data') plus
        the task and the scheme."""
        TrainConfig.validate(dataclasses.replace(self, steps=max(1, self.steps),
                                                 warmup_steps=max(0, self.warmup_steps)))
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown fine-tuning scheme {self.scheme!r}; choose one of "
                             f"{SCHEMES}")
        for name in ("top_k", "lora_rank", "num_beams", "max_tokens", "max_length",
                     "max_new_tokens", "train_limit", "dev_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.steps < 0 or self.epochs < 0:
            raise ValueError(f"steps and epochs must be >= 0 (0 steps = use epochs), got "
                             f"steps={self.steps}, epochs={self.epochs}")
        if self.steps <= 0 and self.epochs <= 0:
            raise ValueError("give a positive number of --steps or --epochs")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not supported; choose one of "
                             f"{POOLINGS}")
        if self.pooling is not None and not HEADS[TASKS[self.task].head].pooled:
            raise ValueError(f"pooling is a classification option, not one of {self.task}")
        if self.parallelism == "fsdp":  # its scoring, LoRA and saving read whole weights
            raise ConfigError("parallelism fsdp shards pretraining (lmkit pretrain); "
                              "fine-tuning runs with parallelism ddp")
        TASKS[self.task].parse_options(self.options(known_only=False))

    def options(self, known_only: bool = True) -> dict[str, Any]:
        """The task options that are set (the rest take the task's defaults)."""
        names = TASKS[self.task].option_names() if known_only else OPTION_FIELDS
        return {k: getattr(self, k) for k in OPTION_FIELDS
                if k in names and getattr(self, k) is not None}


@dataclass
class FinetuneResult:
    out_dir: Path
    metrics: dict[str, float]
    new_tensors: list[str]
    trainable: int
    total: int
    train_examples: int
    steps: int
    wall_time_s: float
    compute: dict[str, Any]
    curve: list[dict[str, Any]] = field(default_factory=list)  # dev metric during training
    best: dict[str, Any] | None = None  # keep-best: the evaluation the final model comes from


def prepare(checkpoint: str | Path, cfg: FinetuneConfig) -> tuple[Model, Task, list, list]:
    """Load the checkpoint with the task's head, read and check the data."""
    base = load(checkpoint)
    task = TASKS[cfg.task](base.tokenizer, base.config, **cfg.options())
    train_examples = task.read(cfg.train, limit=cfg.train_limit)
    if not train_examples:
        raise ValueError(f"{cfg.train} has no examples")
    label_names = task.label_names(train_examples) if task.labelled else None
    if label_names is not None and len(label_names) < 2 and cfg.task == "classification":
        log.warning("%s has a single label (%s): the classifier can only learn to always "
                    "answer it; check the label column (--set label_column=...)", cfg.train,
                    label_names)
    dev_examples = task.read(cfg.dev, label_names=label_names, limit=cfg.dev_limit) \
        if cfg.dev else []
    if task.labelled or task.head != base.config.head:
        model = load(checkpoint, head=task.head, label_names=label_names)
    else:
        model = base
    if model.config.head_spec.pooled:  # a new head pools as the family does unless told
        # A Hugging Face body's config already pools as its family's classifier does (BART:
        # the last EOS; ModernBERT: as its config says), so that the result exports.
        kept = base.config.head == model.config.head or hasattr(base, "hf_model_type")
        family = model.config.family
        model.config.pooling = cfg.pooling or (model.config.pooling if kept
                                               else DEFAULT_POOLING[family])
        model.config.validate()
    if cfg.from_scratch:  # the baseline: same architecture, nothing pretrained
        tokenizer, model = model.tokenizer, Model(model.config)
        model.tokenizer, model.new_tensors = tokenizer, ["(all: trained from scratch)"]
    task.config = model.config
    return model, task, train_examples, dev_examples


def finetune(checkpoint: str | Path, cfg: FinetuneConfig, *, resume: bool = False,
             overwrite: bool = False) -> FinetuneResult:
    """Fine-tune `checkpoint` (an lmkit or Hugging Face folder, or a .gguf file) on a task.

    `cfg.out` must not hold a run already: `resume` continues it from its latest checkpoint
    (see `resume`, which also restores the saved config), `overwrite` deletes it first."""
    cfg.validate()
    cfg.check_keep_best(bool(cfg.dev))
    setup_logging()
    start = time.perf_counter()
    out = Path(cfg.out)
    _claim(out, resume, overwrite)
    trackers = Trackers(cfg.report_to, out, cfg.tensorboard)  # a missing package: said now
    torch.manual_seed(cfg.seed)
    model, task, train_examples, dev_examples = prepare(checkpoint, cfg)
    rank, world, _ = launch_ranks()
    if not resume and rank == 0:
        _save_run_config(out, checkpoint, cfg)
    lora = LoRAConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets))
    counts = apply_scheme(model, cfg.scheme, top_k=cfg.top_k, lora=lora)
    features = [task.features(e) for e in train_examples]
    pad = model.config.fill_id()
    batches = TaskBatches(features, pad, cfg.batch_size, cfg.max_tokens, cfg.seed, rank, world)
    steps = cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * len(batches)
                                                             / cfg.grad_accum))
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else int(0.06 * steps)
    train_cfg = dataclasses.replace(cfg, steps=steps, warmup_steps=warmup)
    dev_batches, scorer = None, None
    if dev_examples and cfg.eval_every:
        if not task.reports_loss:  # the dev loss needs its own pass
            dev_feats = [task.features(e) for e in dev_examples]
            order = length_grouped_batches([len(f["input_ids"]) for f in dev_feats],
                                           cfg.batch_size, shuffle=False)
            dev_batches = [collate([dev_feats[i] for i in idx], pad) for idx in order]
        scorer = _Scorer(lambda: task.evaluate(model, dev_examples, cfg.batch_size))

    if rank == 0 and 0 < len(dev_examples) < SMALL_DEV:
        log.warning("the dev set has only %d examples: its score is noisy (one example is "
                    "%.1f%% of it); give %d or more for a figure to compare runs by",
                    len(dev_examples), 100 / len(dev_examples), SMALL_DEV)
    summary = _summary(checkpoint, cfg, model, features, len(dev_examples), len(batches),
                       world)
    with trackers:
        result = train(model, batches, train_cfg, out, dev_batches, resume=resume,
                       resume_hint=f"lmkit finetune --resume {out}", scorer=scorer,
                       trackers=trackers, summary=summary)
        metrics = scorer.final(result) if scorer else (
            task.evaluate(model, dev_examples, cfg.batch_size) if dev_examples else {})
        curve = [{k: v for k, v in r.items() if k != "split"} for r in read_metrics(out)
                 if r.get("split") == "valid"] if rank == 0 else []
        if dev_examples and not any(p["step"] == result.step for p in curve):
            curve.append({"step": result.step, "flops": result.compute.get("flops"),
                          "elapsed_s": result.compute.get("wall_time_s"), **metrics})
        if model.config.lora:  # keep the adapter alone too, then merge for a plain checkpoint
            save_adapter(model, out / "adapter", base=str(checkpoint))
            _save_peft(model, out / "peft", checkpoint)
            merge_lora(model)
            model.save(out)
        wall = time.perf_counter() - start
        _write_run_files(out, checkpoint, cfg, task, metrics, counts, len(train_examples),
                         result.compute, wall, curve, result.best)
        trackers.finish({**result.final_metrics(), "dev": metrics},
                        [out / CURVE, out / EVAL_FILE, out / CONFIG_FILE, out / COMPUTE])
    return FinetuneResult(out, metrics, list(model.new_tensors), counts["trainable"],
                          counts["total"], len(train_examples), result.step, wall,
                          result.compute, curve, result.best)


class _Scorer:
    """The task's dev scoring, remembering which metrics it gives, so that the final model's
    scores are read back from the evaluation that already scored it."""

    def __init__(self, score: Callable[[], dict[str, float]]):
        self.score, self.names = score, ()

    def __call__(self) -> dict[str, float]:
        scores = self.score()
        self.names = tuple(scores)
        return scores

    def final(self, result: TrainResult) -> dict[str, float]:
        """The scores of the final model: the last step's (or the kept best's), else new."""
        step = result.best["step"] if result.best else result.step
        done = next((r for r in reversed(result.evals) if r["step"] == step), None)
        if done is None or not self.names:
            return self()
        return {k: done[k] for k in self.names}


def _summary(checkpoint: str | Path, cfg: FinetuneConfig, model: Model, features: list,
             n_dev: int, n_batches: int, world: int) -> dict[str, Any]:
    """What the start-up summary says about the model and the data."""
    tokens = sum(len(f["input_ids"]) for f in features)
    per_step = tokens / max(n_batches, 1) * cfg.grad_accum * world  # mean (dynamic padding)
    batch = f"up to {cfg.max_tokens:,} tokens" if cfg.max_tokens else f"{cfg.batch_size}"
    return {"model": f"{checkpoint} ({model.config.family}, {cfg.task} head, {cfg.scheme} "
                     "scheme)",
            "new tensors": ", ".join(model.new_tensors) or "none",
            "data": f"train {len(features):,} examples ({tokens:,} tokens), "
                    + (f"dev {n_dev:,} examples" if n_dev else "no dev set"),
            "batch": f"{batch} x {cfg.grad_accum} accumulation x {world} process"
                     f"{'es' if world > 1 else ''}",
            "tokens per step": per_step}


def resume(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> FinetuneResult:
    """Continue the fine-tuning run in `run_dir` from its latest checkpoint, with its saved
    checkpoint and config (`overrides`, e.g. {"epochs": 5}, change fields)."""
    run_dir = Path(run_dir)
    file = run_dir / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{run_dir} has no {CONFIG_FILE}: it is not a run folder "
                                "written by `lmkit finetune`")
    saved = read_yaml(file)
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}  # None: not given
    cfg = read_config(FinetuneConfig, None, {**saved["config"], **changes, "out": str(run_dir)})
    return finetune(saved["checkpoint"], cfg, resume=True)


def _claim(out: Path, resume: bool, overwrite: bool) -> None:
    """Check that `out` may take this run: a resumed run has a checkpoint; a new one does
    not overwrite another unless told to (then the old run is deleted)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or "
                         "delete it and start again")
    if resume:
        if not list_checkpoints(out):
            raise ValueError(f"{out} has no checkpoint to resume from (none was saved before "
                             "it stopped): start it again without --resume")
        return
    holds_run = any((out / name).exists() for name in (CONFIG_FILE, "checkpoints", "config.json"))
    if holds_run and not overwrite:
        raise ValueError(f"{out} already holds a run: continue it with `lmkit finetune --resume "
                         f"{out}`, replace it with --overwrite, or choose another --out")
    if holds_run and launch_ranks()[0] == 0:
        shutil.rmtree(out)


def _save_peft(model: Model, path: Path, checkpoint: str | Path) -> None:
    """The adapter in PEFT's layout too, for the families transformers has (others: skipped)."""
    try:
        save_peft(model, path, base=checkpoint)
    except CheckpointError as e:
        log.info("no PEFT adapter written (%s)", e)


def _save_run_config(out: Path, checkpoint: str | Path, cfg: FinetuneConfig) -> None:
    """What `resume` reads: the base checkpoint and the config, written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    base = Path(checkpoint).resolve() if Path(checkpoint).exists() else checkpoint
    save_config({"checkpoint": str(base), "config": dataclasses.asdict(cfg)}, out / CONFIG_FILE)


def _write_run_files(out: Path, checkpoint: str | Path, cfg: FinetuneConfig, task: Task,
                     metrics: dict, counts: dict, n_train: int, compute: dict,
                     wall: float, curve: list[dict[str, Any]],
                     best: dict[str, Any] | None) -> None:
    info = {"task": task.name, "options": cfg.options(), "base": str(checkpoint),
            "scheme": cfg.scheme, "from_scratch": cfg.from_scratch}
    (out / TASK_FILE).write_text(json.dumps(info, indent=2) + "\n")
    kept = f"the best evaluation (step {best['step']}, dev {best['metric']} " \
        f"{best['value']:.4g}), not the last step" if best else "the last step"
    labels = {"label_names": task.config.label_names} if task.config.label_names else {}
    (out / EVAL_FILE).write_text(json.dumps({"dev": cfg.dev, **metrics, **labels,
                                             "final_model": kept, "best": best,
                                             "curve": curve}, indent=2) + "\n")
    _write_card(out, checkpoint, cfg, task, metrics, counts, n_train, compute, wall,
                f"The saved model is {kept}." if best else None)


def _write_card(out: Path, checkpoint: str | Path, cfg: FinetuneConfig, task: Task,
                metrics: dict, counts: dict, n_train: int, compute: dict, wall: float,
                note: str | None = None) -> None:
    """README.md: the Hugging Face front matter and the lineage (the base checkpoint's origin,
    its ancestors, the data's sha256, the config, this run's compute and energy)."""
    located = locate(checkpoint)
    base = {"kind": "scratch", "architecture": located.origin} if cfg.from_scratch \
        else located.origin
    data = [data_record(cfg.train, "train"), *([data_record(cfg.dev, "dev")] if cfg.dev else [])]
    record = make_record("finetune", out, base, base_path=None if cfg.from_scratch
                         else located.path, data=data, config=dataclasses.asdict(cfg),
                         compute=compute, task=task.name, scheme=cfg.scheme)
    meta = card_metadata(record, pipeline_tag=PIPELINE_TAGS.get(task.name), metrics=metrics,
                         task=task.name, base_meta=read_card(located.path)[0])
    scores = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
    origin = "its architecture, trained from scratch" if cfg.from_scratch else f"`{checkpoint}`"
    write_card(out, meta, [
        f"Fine-tuned by lmkit for **{task.name}** from {origin} ({cfg.scheme} scheme, "
        f"{counts['trainable']:,} of {counts['total']:,} parameters trained).", "",
        f"- training data: `{cfg.train}` ({n_train:,} examples, sha256 "
        f"{str(data[0]['sha256'])[:16]}...)",
        f"- dev data: `{cfg.dev}`: {scores or 'not scored'}",
        *([f"- labels (in id order): {', '.join(task.config.label_names)}"]
          if task.config.label_names else []),
        f"- compute: {compute.get('flops', 0):.3g} training FLOPs, "
        f"{compute.get('tokens', 0):,} tokens, {wall:.0f} s wall time on "
        f"{compute.get('device', '?')} ({compute.get('precision', '?')}); "
        f"{compute.get('energy_kwh') or 0:.3g} kWh, {compute.get('emissions_kg') or 0:.3g} kg "
        "CO2eq",
        *(["", note] if note else []),
        "", f"Or use it with `lmkit.pipeline(\"{task.name}\", \"{out}\")`."])
