"""The training loop: plain PyTorch.

    result = train(model, batches, TrainConfig(steps=1000), "runs/x", eval_batches=valid)

`train` is the outline; `_Run` holds what the steps share. Per optimizer step it takes
`grad_accum` micro-batches (dicts of model inputs with `labels`) from `batches`; `accumulate`
sums the per-token losses and divides by the number of target tokens of the whole step
(over micro-batches and processes), so the gradient is the same however the global batch is
split; `optimizer_step` checks the loss, clips, steps AdamW and the schedule; `after_step`
logs, evaluates and saves checkpoints on the configured steps.

Resume is exact: a checkpoint holds the weights, the optimizer and scheduler, the random
states and the data position, and a run resumed from it computes the same losses, bit for
bit in fp32, as one that was never stopped. A NaN/inf loss stops the run before the bad step
is applied (no checkpoint is written after it); SIGINT (Ctrl-C) or SIGTERM saves a checkpoint
at the end of the current step and then raises `TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lmkit.checkpoint import clean_staging, refuse_int8
from lmkit.device import check_device, check_precision, resolve_precision
from lmkit.errors import ConfigError, TrainingDiverged, TrainingInterrupted
from lmkit.logs import setup_logging
from lmkit.model import eval_mode
from lmkit.model.layers import lay_out
from lmkit.train.compiled import CompiledStep
from lmkit.train.distributed import (
    PARALLELISM,
    DistEnv,
    all_reduce_sum,
    barrier,
    grad_sync,
    init_distributed,
    unwrap,
    wrap_model,
)
from lmkit.train.energy import EnergyMeter, carbon_intensity
from lmkit.train.metrics import COMPUTE, CURVE, ComputeMeter, describe_device, plot_curves
from lmkit.train.optim import (
    SCHEDULES,
    OptimizerInBackward,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    sparse_embeddings,
)
from lmkit.train.state import (
    CHECKPOINTS,
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    resume_checkpoint,
    save_checkpoint,
    save_model,
    seed_everything,
)
from lmkit.train.trackers import Trackers, check_report_to

log = logging.getLogger("lmkit")
Batch = dict[str, torch.Tensor]
BEST = "best"  # <out>/best: the best model so far, while a keep-best run goes on
_NOT_SCORES = ("split", "step", "tokens", "flops", "elapsed_s", "train_s")  # in a dev record


def greater_is_better(metric: str) -> bool:
    """Whether a higher value of the dev metric `metric` is better (losses, perplexities and
    error rates are lower-is-better; accuracy, F1, BLEU, ... higher)."""
    return not any(w in metric for w in ("loss", "perplexity", "error", "bits_per"))


@dataclass
class TrainConfig:
    """How to train. `batch_size` is rows per micro-batch per process: the global batch is
    batch_size x grad_accum x number of processes."""

    # Fields added after runs were saved without them: a saved config that lacks one resumes
    # with its default, which is how that run trained (a new field must default to the old
    # behaviour, and be listed here).
    LATER_FIELDS: ClassVar[tuple[str, ...]] = (
        "parallelism", "sparse_embeddings", "stop_at", "optimizer_in_backward", "compile")

    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # rows per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate (AdamW)
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 100  # linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    weight_decay: float = 0.1  # not applied to norms, biases, embeddings
    layer_decay: float = 0.0  # layer-wise lr decay: each block below gets this x the rate
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    eps: float = 1e-8  # AdamW
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; weights, optimizer stay fp32)
    activation_checkpointing: bool = False  # recompute blocks in backward: less memory
    # torch.compile the training step (C++ on CPU, Triton on CUDA): faster steps after a
    # compilation at the first one; falls back to eager, with a warning, if it cannot compile
    compile: bool = False
    # update only the token-embedding rows a step uses (lazy Adam; train/optim.py
    # sparse_embeddings): much less optimizer work for small batches; untied, one process
    sparse_embeddings: bool = False
    # step each parameter in backward as soon as its gradient is ready, then free it: no
    # memory for all the gradients at once (train/optim.py OptimizerInBackward); one
    # process, grad_accum 1, grad_clip 0
    optimizer_in_backward: bool = False
    eval_every: int = 200  # steps; 0 = never (also at step 0 and the last step)
    save_every: int = 500  # steps; 0 = only at the end (and on Ctrl-C)
    keep_checkpoints: int = 3  # 0 = keep all
    log_every: int = -1  # steps per train record; -1 = about 100 records (at most every 10)
    seed: int = 0  # model init, data order, dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallelism: str = "ddp"  # ddp | fsdp (torchrun: shard parameters, gradients, optimizer)
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # false drops TensorBoard even where report_to has it
    plot: bool = True  # loss.png at the end
    # trackers besides metrics.jsonl: tensorboard, mlflow, wandb; auto = TensorBoard where
    # it is installed; none = metrics.jsonl only
    report_to: list[str] = field(default_factory=lambda: ["auto"])
    patience: int = 0  # stop after this many evaluations without a better best_metric; 0 = off
    best_metric: str | None = None  # keep the best model by this dev metric (loss, accuracy,
    # macro_f1, ...; lower is better for losses) as the final one; patience alone: loss
    stop_at: float | None = None  # stop once the dev best_metric reaches this (accuracy 88)
    carbon_intensity: str = "world"  # g CO2eq/kWh, or a country code (FRA, FR): train/energy.py

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # NaN passes every comparison below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.log_every < 1 and self.log_every != -1:
            raise ValueError(f"log_every must be at least 1 (or -1: about 100 records per "
                             f"run), got {self.log_every}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints",
                     "grad_clip", "weight_decay", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.eps <= 0:
            raise ConfigError(f"eps must be positive, got {self.eps}")
        if not 0.0 <= self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in [0, 1] (0 = off), got {self.layer_decay}")
        check_precision(self.precision)
        check_device(self.device)
        if self.parallelism not in PARALLELISM:
            raise ConfigError(f"parallelism={self.parallelism!r}: choose ddp (each process "
                              "holds the model) or fsdp (each holds a shard of it)")
        carbon_intensity(self.carbon_intensity)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not supported; choose one of "
                             f"{SCHEDULES}")
        check_report_to(self.report_to)
        self.check_optimizer_in_backward()

    def check_optimizer_in_backward(self) -> None:
        """What stepping each parameter in backward cannot do, refused with the fix."""
        if not self.optimizer_in_backward:
            return
        fix = "or drop optimizer_in_backward"
        if self.grad_accum > 1:
            raise ConfigError(f"optimizer_in_backward steps after each backward, so it cannot "
                              f"accumulate gradients: set grad_accum: 1 (a larger batch_size "
                              f"instead) {fix}")
        if self.grad_clip > 0:
            raise ConfigError(f"optimizer_in_backward steps each parameter before the global "
                              f"gradient norm exists, so it cannot clip by it: set grad_clip: 0 "
                              f"(--set grad_clip=0) {fix}")
        if self.sparse_embeddings:
            raise ConfigError(f"optimizer_in_backward takes dense gradients: set "
                              f"sparse_embeddings: false {fix}")

    def check_keep_best(self, has_dev: bool) -> None:
        """patience and best_metric need dev evaluations (checked when a run starts)."""
        if (self.patience or self.best_metric) and not (has_dev and self.eval_every):
            raise ConfigError("patience and best_metric compare dev evaluations: give dev "
                              "data and the steps between evaluations (--eval-every N)")
        if self.stop_at is not None and self.best_metric is None:
            raise ConfigError("stop_at is a value of the dev best_metric: name it too "
                              "(--best-metric accuracy)")


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # the global step reached
    start_step: int  # 0, or the step this call resumed from
    losses: list[float] = field(default_factory=list)  # train loss of each step of this call
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss", "perplexity"}
    stopped: str = "completed"  # completed | max_steps | data_exhausted | early_stopped
    checkpoint: Path | None = None  # the last checkpoint written
    compute: dict[str, Any] = field(default_factory=dict)
    best: dict[str, Any] | None = None  # keep-best: {"metric", "value", "step"} of the final
    # model (the best evaluation, not the last step)

    def final_metrics(self) -> dict[str, Any]:
        """What a tracker records at the end: compute totals and the final model's
        evaluation (the best one when the best was kept, else the last)."""
        step = self.best["step"] if self.best else None
        ev = next((e for e in reversed(self.evals) if step is None or e["step"] == step), {})
        return {"step": self.step, "tokens": self.compute.get("tokens"),
                "flops": self.compute.get("flops"),
                "wall_time_s": self.compute.get("wall_time_s"),
                "valid": {k: v for k, v in ev.items() if k not in ("split", "step")}}


# ---- pieces ---------------------------------------------------------------------------------


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for a resolved precision ("bf16"), nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def count_tokens(batch: Batch) -> int:
    """Real (non-padding) input tokens of a batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "segment_ids" in batch:
        return int((batch["segment_ids"] > 0).sum())
    return batch["input_ids"].numel()


def _to(batch: Batch, device: torch.device) -> Batch:
    if "labels" not in batch:
        raise ValueError(f"a training batch has no labels (keys: {sorted(batch)}): turn token "
                         "rows into model inputs with an objective (lmkit.objectives)")
    pin = device.type == "cuda"  # page-locked host memory: the copy overlaps the GPU's work
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin)
            for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], precision: str = "auto",
             env: DistEnv | None = None) -> dict[str, float]:
    """Mean loss per target token over `batches` (summed over all processes, each giving its
    own share) and its perplexity exp(loss)."""
    model = unwrap(model)
    env = env or DistEnv(device=next(model.parameters()).device)
    precision = resolve_precision(precision, env.device)
    sums = torch.zeros(2, dtype=torch.float64, device=env.device)
    with eval_mode(model):
        for batch in batches:
            batch = _to(batch, env.device)
            with autocast(precision, env.device):
                out = model(**batch)
            sums += torch.stack([out.loss_sum.double(), out.num_targets.double()])
    all_reduce_sum(sums, env)
    total, n = sums.tolist()
    if not n:
        raise ValueError("the evaluation batches have no target tokens to score")
    loss = total / n
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


class _StopSignals:
    """SIGINT/SIGTERM set a flag the loop reads at the end of each step (a second Ctrl-C
    stops at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def reduce_loss_and_stop_flag(loss_sum: torch.Tensor, stop: bool,
                              env: DistEnv) -> tuple[torch.Tensor, bool]:
    """The cross-rank exchange at the end of each step, one all-reduce for two sums: the
    step's summed loss, and how many ranks received a stop signal. Every rank then stops at
    the same step (and saves the same checkpoint) when any one of them was signalled."""
    stats = torch.stack([loss_sum, loss_sum.new_tensor(float(stop))])
    all_reduce_sum(stats, env)
    return stats[0], stats[1].item() > 0


def _resume_sources(out_dir: Path, resume: bool | str | Path, hint: str) -> list[Path]:
    """The checkpoints a resume may use, oldest first: all of a run (the newest intact one
    is taken), or the one folder given."""
    if resume is False or resume is None:
        if list_checkpoints(out_dir):
            raise ValueError(f"{out_dir} already holds checkpoints of a run: resume it "
                             f"({hint}) or choose a new output folder")
        return []
    if resume is True:
        found = list_checkpoints(out_dir)
        if not found:
            raise ValueError(f"no checkpoint to resume from in {out_dir}/checkpoints")
        return found
    path = Path(resume)
    if (path / CHECKPOINTS).is_dir():  # a run folder: its latest intact checkpoint
        found = list_checkpoints(path)
        if found:
            return found
    return [path]


# ---- the loop ---------------------------------------------------------------------------------


def train(model: nn.Module, batches: Iterable[Batch], cfg: TrainConfig, out_dir: str | Path,
          eval_batches: Iterable[Batch] | None = None, *, resume: bool | str | Path = False,
          max_steps: int | None = None,
          on_step: Callable[[int, dict[str, Any]], None] | None = None,
          resume_hint: str | None = None, scorer: Callable[[], dict[str, float]] | None = None,
          trackers: Trackers | None = None,
          summary: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` (an lmkit.Model) on `batches` for `cfg.steps` optimizer steps.

    batches: an iterable of input dicts with labels (see lmkit.objectives); give a
        `BatchStream` (or anything with state_dict/load_state_dict) for exact resume.
    eval_batches: a re-iterable of input dicts (a list), scored every `cfg.eval_every` steps.
    resume: True = continue from the latest checkpoint in `out_dir`; or a checkpoint folder.
    max_steps: stop this call at that global step (saving a checkpoint); the schedule still
        runs to `cfg.steps`.
    on_step: called as on_step(step, record) after every step, on every process.
    resume_hint: how the caller's user continues this run (`lmkit pretrain --resume RUN`),
        for the Ctrl-C and "run exists" messages.
    scorer: called at each evaluation (with `eval_batches` or alone); its metrics (e.g.
        {"accuracy": 91.2}) join the dev loss in the record, the progress bar and the plot.
    trackers: where records go (`Trackers`); by default metrics.jsonl and cfg.report_to,
        finished and closed here (a caller that passes its own finishes and closes them).
    summary: what the caller knows for the start-up summary ({"model": "tiny-decoder",
        "data": "...", "tokens per step": 4096, "new tensors": "..."}).

    `cfg.best_metric` / `cfg.patience`: the model of the best evaluation is kept (in
    <out>/best while the run goes on) and becomes the final model; the run stops early after
    `patience` evaluations without a better one. Both resume exactly.

    Writes to `out_dir` (rank 0 only): checkpoints/step-N/, metrics.jsonl (and the trackers'
    records), compute.json, loss.png and, once cfg.steps are done (or the run stopped
    early), the final model (config.json, model.safetensors, tokenizer.json)."""
    cfg.validate()
    cfg.check_keep_best(eval_batches is not None or scorer is not None)
    refuse_int8(model)  # int8 weights are for inference
    setup_logging()
    hint = f"`{resume_hint}`, or train(..., resume=True)" if resume_hint else \
        "train(..., resume=True)"
    own = trackers is None
    trackers = trackers or Trackers(cfg.report_to, out_dir, cfg.tensorboard)
    with trackers if own else contextlib.nullcontext():
        run = _Run(model, batches, cfg, Path(out_dir), eval_batches, resume, max_steps, on_step,
                   hint, scorer, trackers, summary or {})
        try:
            with _StopSignals() as signals:
                if run.evals_on and run.source is None:
                    run.evaluate()
                while run.step < run.end and run.result.stopped != "early_stopped":
                    micro = run.next_micro_batches()
                    if micro is None:
                        break
                    loss, stop = run.accumulate(micro, signals.signum is not None)
                    run.optimizer_step(loss, micro)
                    run.after_step(loss, stop, signals.signum)
                if run.result.stopped in ("data_exhausted", "early_stopped") and \
                        run.step > run.start_step and run.saved_step != run.step:
                    run.checkpoint()
            run.finish()
        finally:
            run.close()
        if own:
            trackers.finish(run.result.final_metrics(), [Path(out_dir) / CURVE,
                                                         Path(out_dir) / COMPUTE])
    return run.result


class _Run:
    """What one call of `train` shares between its steps: the model, optimizer, schedule,
    data, records and the step counter."""

    def __init__(self, model: nn.Module, batches: Iterable[Batch], cfg: TrainConfig,
                 out_dir: Path, eval_batches: Iterable[Batch] | None,
                 resume: bool | str | Path, max_steps: int | None,
                 on_step: Callable[[int, dict[str, Any]], None] | None, hint: str,
                 scorer: Callable[[], dict[str, float]] | None, trackers: Trackers,
                 summary: dict[str, Any]):
        self.cfg, self.out_dir, self.batches, self.hint = cfg, out_dir, batches, hint
        self.eval_batches, self.on_step, self.scorer = eval_batches, on_step, scorer
        self.env = env = init_distributed(cfg.device)
        self.precision = resolve_precision(cfg.precision, env.device)
        self.model = model.to(env.device)
        model.train()
        lay_out(model, decoding=False)  # row-major again if generate() laid them out
        for option in ("sparse_embeddings", "optimizer_in_backward"):
            if getattr(cfg, option) and env.distributed:
                raise ConfigError(f"{option} runs in one process: leave it off with torchrun")
        if cfg.sparse_embeddings:
            sparse_embeddings(model)
        model.activation_checkpointing(cfg.activation_checkpointing)
        self.net = wrap_model(model, env, cfg.parallelism)  # FSDP: before the optimizer
        self.compiled = CompiledStep(self.net, cfg.compile)  # the training step only
        self.optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay,
                                         (cfg.beta1, cfg.beta2), cfg.eps, cfg.layer_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.warmup_steps,
                                         cfg.steps, cfg.min_lr_ratio)
        if env.is_main:  # what a kill during a save left behind
            clean_staging(out_dir / CHECKPOINTS)
            clean_staging(out_dir.parent, out_dir.name)
        sources = _resume_sources(out_dir, resume, hint)
        self.source, state = None, {}
        if sources:
            self.source, state = resume_checkpoint(sources, model, self.optimizer,
                                                   self.scheduler, batches, env)
        else:
            seed_everything(cfg.seed + env.rank)
        self.step = self.start_step = int(state.get("step", 0))
        self.saved_step = self.step if self.source is not None else None
        self.drawn = int(state.get("batches", 0))  # micro-batches taken from `batches` so far
        self.end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
        self.log_every = cfg.log_every if cfg.log_every > 0 else \
            max(1, min(10, cfg.steps // 100))  # a short run still draws a curve
        energy = EnergyMeter(env.device, intensity=cfg.carbon_intensity,
                             world_size=env.world_size) if env.is_main else None
        self.compute = ComputeMeter(model, state.get("compute"), step=self.step, energy=energy,
                                    **self.compute_extra(with_steps=False))
        self.result = TrainResult(out_dir, self.step, self.start_step, checkpoint=self.source)
        self.evals_on = (eval_batches is not None or scorer is not None) and cfg.eval_every > 0
        keep_best = self.evals_on and (cfg.best_metric is not None or cfg.patience > 0)
        metric = cfg.best_metric or "loss"
        saved = state.get("best")  # a resumed run goes on counting from its checkpoint
        self.best = (saved if saved and saved["metric"] == metric else
                     {"metric": metric, "value": None, "step": None, "bad_evals": 0}) \
            if keep_best else None
        if self.best and cfg.patience and self.best["bad_evals"] >= cfg.patience:
            self.result.stopped = "early_stopped"  # it had stopped before this resume
        self.dev: dict[str, str] = {}  # the dev metric shown in the progress bar
        self.trackers = trackers
        params = {**dataclasses.asdict(cfg), **self.counts()}
        trackers.start(params, self.start_step if self.source is not None else None,
                       env.is_main)
        if env.is_main:
            self.warn_about_settings()
            log.info("\n".join(self.summary(summary)))
        self.bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                        disable=not (env.is_main and cfg.progress))
        self.data = iter(batches)
        self.session_start = time.perf_counter()
        self.window: list[float] = []
        self.eval_s = 0.0  # seconds spent in this call's evaluations
        # last (close() removes the hooks) and after the resume: they step the loaded optimizer
        self.in_backward = OptimizerInBackward(self.optimizer) \
            if cfg.optimizer_in_backward else None

    def counts(self) -> dict[str, int]:
        params = list(self.model.parameters())
        return {"parameters": sum(p.numel() for p in params),
                "trainable_parameters": sum(p.numel() for p in params if p.requires_grad)}

    def warn_about_settings(self) -> None:
        cfg = self.cfg
        if cfg.warmup_steps >= cfg.steps:
            log.warning("warmup_steps=%d >= steps=%d: the whole run is warmup and the learning "
                        "rate never reaches lr=%g; set fewer warmup steps (e.g. --set "
                        "warmup_steps=%d)", cfg.warmup_steps, cfg.steps, cfg.lr,
                        max(0, cfg.steps // 10))

    def summary(self, given: dict[str, Any]) -> list[str]:
        """The start-up summary: what trains on what, where, how long, and where it goes."""
        cfg, env, counts = self.cfg, self.env, self.counts()
        share = counts["trainable_parameters"] / max(counts["parameters"], 1)
        rows = cfg.batch_size * cfg.grad_accum * env.world_size
        batch = f"{cfg.batch_size} x {cfg.grad_accum} accumulation x {env.world_size} " \
                f"process{'es' if env.world_size > 1 else ''} = {rows} rows" \
            if not given.get("batch") else given["batch"]
        tokens = given.get("tokens per step")
        resumed = f", resumed at step {self.step}" if self.source is not None else ""
        lines = {
            "model": f"{given.get('model', type(unwrap(self.model)).__name__)}: "
                     f"{counts['parameters']:,} parameters, {counts['trainable_parameters']:,}"
                     f" trainable ({share:.0%})",
            "new tensors": given.get("new tensors"),
            "data": given.get("data"),
            "device": f"{describe_device(env.device, env.world_size)}"
                      + (f" ({cfg.parallelism})" if env.distributed else "")
                      + f", precision {self.precision} (asked: {cfg.precision})",
            "steps": f"{cfg.steps}{resumed} (warmup {cfg.warmup_steps}, {cfg.schedule} "
                     f"schedule, lr {cfg.lr:g}"
                     + (", AdamW in backward" if cfg.optimizer_in_backward else "")
                     + f"); batch {batch}"
                     + (f", ~{tokens:,.0f} tokens per step" if tokens else ""),
            "evaluation": self.describe_evaluation(),
            "output": f"{self.out_dir} (records: "
                      f"{', '.join(['metrics.jsonl', *self.trackers.names])})",
        }
        return ["training run"] + [f"  {k:<12} {v}" for k, v in lines.items() if v]

    def describe_evaluation(self) -> str:
        if not self.evals_on:
            return "none"
        what = f"every {self.cfg.eval_every} steps"
        if self.best is not None:
            what += f"; the best model by dev {self.best['metric']} is kept as the final one"
            if self.cfg.patience:
                what += f", stopping after {self.cfg.patience} evaluations without a better one"
        return what

    def next_micro_batches(self) -> list[Batch] | None:
        """The step's `grad_accum` micro-batches on the device; None when the data ran out."""
        try:
            micro = [_to(next(self.data), self.env.device) for _ in range(self.cfg.grad_accum)]
            self.drawn += self.cfg.grad_accum
            return micro
        except StopIteration:
            self.result.stopped = "data_exhausted"
            if self.env.is_main:
                log.warning("the training data ran out at step %d of %d", self.step,
                            self.cfg.steps)
            return None

    def accumulate(self, micro: list[Batch], stop: bool) -> tuple[float, bool]:
        """Forward and backward over the micro-batches, each loss sum scaled by the number of
        targets of the whole step (all micro-batches, all ranks). Returns the step's mean
        loss and whether any rank was asked to stop."""
        env, model = self.env, self.model
        targets = [model.num_targets(b["labels"]) for b in micro]
        counts = torch.tensor([sum(targets), sum(map(count_tokens, micro))],
                              dtype=torch.float64, device=env.device)
        n_targets, self.n_tokens = all_reduce_sum(counts, env).tolist()
        scale = env.world_size / max(n_targets, 1.0)
        total = torch.zeros((), device=env.device)

        def forward_backward(net: nn.Module, batch: Batch) -> torch.Tensor:
            with autocast(self.precision, env.device):  # no logits kept (model/loss.py)
                out = net(**batch, return_logits=False)
            if self.in_backward is not None:  # backward applies the step: check first
                self.check_finite("loss", (out.loss_sum / max(n_targets, 1.0)).item())
            (out.loss_sum * scale).backward()
            return out.loss_sum.detach().float()

        for i, batch in enumerate(micro):
            with grad_sync(self.net, env, i == len(micro) - 1):
                total += self.compiled(forward_backward, batch)
        loss_sum, stop = reduce_loss_and_stop_flag(total, stop, env)
        return (loss_sum / max(n_targets, 1.0)).item(), stop

    def optimizer_step(self, loss: float, micro: list[Batch]) -> None:
        """Check the loss and the gradient norm, clip, step AdamW and the schedule (with
        optimizer_in_backward, backward has stepped AdamW already)."""
        self.check_finite("loss", loss)
        self.lr = self.optimizer.param_groups[0]["lr"]
        if self.in_backward is not None:
            self.grad_norm = float(self.in_backward.grad_norm())
            self.check_finite("gradient norm", self.grad_norm, applied=True)
        else:
            self.grad_norm = float(clip_gradients(self.model, self.cfg.grad_clip))
            self.check_finite("gradient norm", self.grad_norm)
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = self.result.step = self.step + 1
        self.compute.add(int(self.n_tokens), micro[0]["input_ids"].shape[1])

    def check_finite(self, what: str, value: float, applied: bool = False) -> None:
        """Stop the run with TrainingDiverged when `value` is NaN or infinite."""
        if not math.isfinite(value):
            raise TrainingDiverged(_diverged(what, value, self.step + 1, self.out_dir, applied))

    def after_step(self, loss: float, stop: bool, signum: int | None) -> None:
        """Record the step; on a stop signal save and raise; evaluate and save on schedule."""
        cfg, step = self.cfg, self.step
        self.result.losses.append(loss)
        self.window.append(loss)
        elapsed = time.perf_counter() - self.session_start
        session_tokens = self.compute.segment["tokens"]  # this session's, not the run's
        record = {"split": "train", "step": step, "loss": loss, "lr": self.lr,
                  "grad_norm": self.grad_norm, "tokens": self.compute.tokens,
                  "flops": self.compute.flops, "tokens_per_s": session_tokens / elapsed,
                  "elapsed_s": self.compute.wall_time_s}
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", **self.dev,
                             tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
        if step % self.log_every == 0 or step == self.end:
            self.trackers.log({**record, "loss": sum(self.window) / len(self.window)})
            self.window.clear()
        if stop:
            path = self.checkpoint()
            name = signal.Signals(signum or signal.SIGINT).name
            message = (f"{name} received: stopped at step {step}; checkpoint saved to {path}. "
                       f"Continue with {self.hint}.")
            if self.env.is_main:
                tqdm.write(message)
            raise TrainingInterrupted(message, path)
        if self.evals_on and (step % cfg.eval_every == 0 or step == cfg.steps):
            self.evaluate()
        if (cfg.save_every and step % cfg.save_every == 0) or step == self.end or \
                self.result.stopped == "early_stopped":
            self.checkpoint()
        if self.on_step is not None:
            self.on_step(step, record)

    def evaluate(self) -> None:
        """Dev loss (with eval_batches) and the scorer's metrics: recorded, shown, and
        compared with the best so far."""
        start = time.perf_counter()
        record: dict[str, Any] = {"split": "valid", "step": self.step}
        if self.eval_batches is not None:
            record.update(evaluate(self.model, self.eval_batches, self.precision, self.env))
        if self.scorer is not None:
            record.update(self.scorer())
            lay_out(self.model, decoding=False)  # a scorer that decodes (seq2seq) laid them out
        self.eval_s += time.perf_counter() - start
        # train_s: the wall time without this call's evaluations (time to reach a score)
        record.update(tokens=self.compute.tokens, flops=self.compute.flops,
                      elapsed_s=self.compute.wall_time_s,
                      train_s=self.compute.wall_time_s - self.eval_s)
        self.trackers.log(record)
        self.result.evals.append(record)
        scores = {k: v for k, v in record.items() if k not in _NOT_SCORES
                  and isinstance(v, (int, float))}
        shown = self.best["metric"] if self.best else next(
            (k for k in scores if k not in ("loss", "perplexity")), "loss")
        start = time.perf_counter()
        note = self.track_best(record, scores)  # may save the model: not training time either
        self.eval_s += time.perf_counter() - start
        if self.best is not None and self.cfg.stop_at is not None and (
                record[shown] >= self.cfg.stop_at if greater_is_better(shown)
                else record[shown] <= self.cfg.stop_at):
            self.result.stopped = "early_stopped"
            note += f"; reached {shown} {self.cfg.stop_at:g}: early stop"
        self.dev = {f"dev_{shown}": f"{record[shown]:.4g}"}
        if self.env.is_main and (self.cfg.progress or "early stop" in note):
            shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
            log.info(f"step {self.step}: dev {shown}{note}")

    def track_best(self, record: dict[str, Any], scores: dict[str, float]) -> str:
        """Keep-best and early stopping: save the model when `record` beats the best so far,
        count the evaluations without a better one. Returns a note for the progress line."""
        best = self.best
        if best is None:
            return ""
        name = best["metric"]
        if name not in scores:
            raise ConfigError(f"best_metric={name!r} is not a dev metric of this run; choose "
                              f"one of {sorted(scores)}")
        value = record[name]
        if best["value"] is None or (value > best["value"] if greater_is_better(name)
                                     else value < best["value"]):
            best.update(value=value, step=self.step, bad_evals=0)
            save_model(self.model, self.out_dir / BEST, self.env)
            return " (best so far)"
        best["bad_evals"] += 1
        if self.cfg.patience and best["bad_evals"] >= self.cfg.patience:
            self.result.stopped = "early_stopped"
            return (f" (best: {best['value']:.4g} at step {best['step']}); early stop: "
                    f"{best['bad_evals']} evaluations without a better dev {name}")
        return f" (best: {best['value']:.4g} at step {best['step']})"

    def checkpoint(self) -> Path:
        extra = {"compute": self.compute.state_dict(), "batches": self.drawn,
                 "best": dict(self.best) if self.best else None}
        path = save_checkpoint(self.out_dir, self.step, self.model, self.optimizer,
                               self.scheduler, self.batches, self.env,
                               self.cfg.keep_checkpoints, extra)
        self.result.checkpoint, self.saved_step = path, self.step
        if self.env.is_main:
            self.compute.write(self.out_dir, self.compute.summary(**self.compute_extra()))
        return path

    def finish(self) -> None:
        """Save the final model once all steps are done (or the data ran out, or the run
        stopped early): the best evaluation's model when the best is kept."""
        if self.step >= self.cfg.steps or self.result.stopped in ("data_exhausted",
                                                                  "early_stopped"):
            best = self.best
            if best is not None and best["step"] is not None:
                barrier(self.env)  # rank 0 wrote it
                load_weights(unwrap(self.model), self.out_dir / BEST)
                self.result.best = {k: best[k] for k in ("metric", "value", "step")}
            save_model(self.model, self.out_dir, self.env)
            if self.env.is_main and best is not None:
                shutil.rmtree(self.out_dir / BEST, ignore_errors=True)
        elif self.step == self.end:
            self.result.stopped = "max_steps"

    def close(self) -> None:
        if self.in_backward is not None:  # plain backward again for whoever uses the model
            self.in_backward.remove()
        if self.cfg.sparse_embeddings:  # dense again for whoever uses the model next
            sparse_embeddings(unwrap(self.model), False)
        self.bar.close()
        self.compute.stop()
        self.result.compute = self.compute.summary(**self.compute_extra())  # = compute.json
        if self.env.is_main:
            self.compute.write(self.out_dir, self.result.compute)
            if self.cfg.plot:
                try:
                    plot_curves(self.out_dir, metric=self.cfg.best_metric)
                except Exception as e:  # a plot must never hide the real outcome
                    log.warning("could not draw the loss curve: %s", e)

    def compute_extra(self, with_steps: bool = True) -> dict[str, Any]:
        """What the run ran on, as resolved (precision "auto" is written as what it chose)."""
        env = self.env
        extra = {"device": describe_device(env.device, env.world_size),
                 "torch_device": str(env.device), "world_size": env.world_size,
                 "precision": self.precision}
        return {"steps": self.step, **extra} if with_steps else extra


def _diverged(what: str, value: float, step: int, out_dir: Path, applied: bool = False) -> str:
    last = latest_checkpoint(out_dir)
    where = (f"the last good checkpoint is {last}; resume from it with a lower learning rate "
             "(e.g. --set lr=...) or a stronger grad_clip"
             if last is not None else "no checkpoint had been saved yet")
    done = ("optimizer_in_backward had applied that step to the weights in memory (no "
            "checkpoint or model was written after it)" if applied else
            "that step was not applied")
    return f"the training {what} is {value} at step {step}: training stopped and {done}; {where}"
