"""Where a run's records go: a list of sinks that the training loop calls with the same events.

    trackers = Trackers(["mlflow"], "runs/x")     # metrics.jsonl is always one of the sinks
    trackers.start(params, resume_step=None)      # the config and the start-up summary
    trackers.log({"split": "train", "step": 10, "loss": 2.31, "lr": 3e-4, ...})
    trackers.finish({"valid/loss": 2.2}, [Path("runs/x/loss.png"), ...])
    trackers.close()

Events: the parameters at the start; one record per log step (train loss, learning rate,
throughput) and per evaluation (dev loss and task metrics: split "valid"); the final metrics
and the artifacts (the plot, eval.json, the run config) at the end. Sinks: metrics.jsonl
(always), TensorBoard, MLflow, Weights & Biases, named by `report_to` (["auto"]: TensorBoard
when it is installed, nothing else). The optional packages are imported only when their sink
is asked for (extra `track`). Only rank 0 reports. A resumed run continues the same MLflow /
W&B run (their ids are kept in trackers.json). A tracker that fails after the start (a
server gone away) is dropped with a warning: records never stop a training run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from lmkit.errors import require
from lmkit.train.metrics import METRICS, TENSORBOARD, read_metrics

log = logging.getLogger("lmkit")
REPORT_TO = ("auto", "none", "tensorboard", "mlflow", "wandb")
IDS_FILE = "trackers.json"
_MODULES = {"tensorboard": ("torch.utils.tensorboard", "TensorBoard logging"),
            "mlflow": ("mlflow", "MLflow tracking"),
            "wandb": ("wandb", "Weights & Biases tracking")}


def check_report_to(names: list[str]) -> None:
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ValueError(f"report_to={unknown} is not supported; choose from {REPORT_TO} "
                         "(e.g. --report-to mlflow,tensorboard)")


def resolve(report_to: list[str], tensorboard: bool = True) -> list[str]:
    """The trackers `report_to` names: "auto" is TensorBoard where it is installed (silently
    nothing on a plain install), "none" nothing; `tensorboard=False` drops TensorBoard."""
    check_report_to(report_to)
    names: list[str] = []
    for name in report_to:
        if name == "auto":
            name = TENSORBOARD if importlib.util.find_spec("tensorboard") else "none"
        if name != "none" and name not in names and (tensorboard or name != TENSORBOARD):
            names.append(name)
    return names


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k not in ("step", "split")
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"hidden_size": 64}} -> {"model.hidden_size": 64}."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Sink:
    """One destination of a run's records; every method may be left as is."""

    run_id: str | None = None  # for trackers with runs of their own (resumed by id)

    def log(self, record: dict[str, Any]) -> None: ...

    def finish(self, final: dict[str, float], artifacts: list[Path]) -> None: ...

    def close(self, status: str) -> None: ...  # "finished" | "failed" | "killed"


class JsonlSink(Sink):
    """One JSON record per line in metrics.jsonl. A resumed run first drops the records of
    steps after its checkpoint (written by the interrupted session)."""

    def __init__(self, out_dir: Path, params: dict, resume_step: int | None, run_id: Any):
        self.file = out_dir / METRICS
        kept = [r for r in read_metrics(self.file) if r.get("step", 0) <= resume_step] \
            if resume_step is not None else []
        tmp = self.file.with_name(f".{METRICS}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.file)
        self.fh = open(self.file, "a")  # noqa: SIM115 (open for the run's lifetime)

    def log(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self, status: str) -> None:
        self.fh.close()


class TensorBoardSink(Sink):
    """Scalars under `split/name` in out_dir/tensorboard, the parameters as text."""

    def __init__(self, out_dir: Path, params: dict, resume_step: int | None, run_id: Any):
        writer = require("torch.utils.tensorboard", "track", "TensorBoard logging")
        purge = resume_step + 1 if resume_step is not None else None
        self.tb = writer.SummaryWriter(str(out_dir / TENSORBOARD), purge_step=purge)
        self.tb.add_text("params", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log(self, record: dict[str, Any]) -> None:
        for k, v in _numbers(record).items():
            self.tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])

    def finish(self, final: dict[str, float], artifacts: list[Path]) -> None:
        for k, v in final.items():
            self.tb.add_scalar(f"final/{k}", v)

    def close(self, status: str) -> None:
        self.tb.close()


class MLflowSink(Sink):
    """A run in the tracking store MLflow is configured with (MLFLOW_TRACKING_URI, else
    MLflow's default), in the experiment MLFLOW_EXPERIMENT_NAME (default "lmkit"), named
    after the run folder."""

    STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    def __init__(self, out_dir: Path, params: dict, resume_step: int | None,
                 run_id: str | None):
        mlflow = require("mlflow", "track", "MLflow tracking")
        self.entities = mlflow.entities
        self.client = mlflow.tracking.MlflowClient()
        if run_id is not None:  # a resumed run: the same MLflow run, its params kept
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lmkit")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else \
            self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=out_dir.resolve().name,
                                     tags={"lmkit.out": str(out_dir.resolve())})
        self.run_id = run.info.run_id
        self.client.log_batch(self.run_id, params=[
            self.entities.Param(k, str(v)[:500]) for k, v in params.items()])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            self.entities.Metric(k, v, now, step) for k, v in values.items()])

    def log(self, record: dict[str, Any]) -> None:
        split = record.get("split", "train")
        self._metrics({f"{split}/{k}": v for k, v in _numbers(record).items()},
                      record["step"])

    def finish(self, final: dict[str, float], artifacts: list[Path]) -> None:
        self._metrics({f"final/{k}": v for k, v in final.items()}, 0)
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, self.STATUS[status])


class WandbSink(Sink):
    """A Weights & Biases run in project WANDB_PROJECT (default "lmkit"), named after the run
    folder; WANDB_MODE=offline writes it under WANDB_DIR (else ./wandb) for a later sync."""

    def __init__(self, out_dir: Path, params: dict, resume_step: int | None,
                 run_id: str | None):
        self.wandb = require("wandb", "track", "Weights & Biases tracking")
        self.name = out_dir.resolve().name
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "lmkit"),
                                   name=self.name, config=params, id=run_id,
                                   resume="allow" if run_id else None)
        self.run_id = self.run.id

    def log(self, record: dict[str, Any]) -> None:
        split = record.get("split", "train")
        self.run.log({f"{split}/{k}": v for k, v in _numbers(record).items()},
                     step=record["step"])

    def finish(self, final: dict[str, float], artifacts: list[Path]) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})
        if artifacts:
            name = re.sub(r"[^\w.-]", "-", f"{self.name}-files")
            artifact = self.wandb.Artifact(name, type="run-files")
            for path in artifacts:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


SINKS: dict[str, type[Sink]] = {"tensorboard": TensorBoardSink, "mlflow": MLflowSink,
                                "wandb": WandbSink}


class Trackers:
    """The sinks of one run: metrics.jsonl plus those `report_to` names. Built before the
    run (a missing package is an error at once, naming the extra); opened by `start` on
    rank 0 only."""

    def __init__(self, report_to: list[str], out_dir: str | Path, tensorboard: bool = True):
        self.names = resolve(report_to, tensorboard)
        for name in self.names:  # fail before any work, not after the data is read
            require(_MODULES[name][0], "track", _MODULES[name][1])
        self.out_dir = Path(out_dir)
        self.sinks: list[Sink] = []

    def start(self, params: dict[str, Any], resume_step: int | None = None,
              enabled: bool = True) -> None:
        """Open the sinks (`enabled`: this process reports, i.e. rank 0) with the run's
        parameters; `resume_step`: the step a resumed run continues from."""
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ids_file = self.out_dir / IDS_FILE
        ids = json.loads(ids_file.read_text()) if resume_step is not None and \
            ids_file.is_file() else {}
        params = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                  for k, v in flatten(params).items()}
        self.sinks = [JsonlSink(self.out_dir, params, resume_step, None)]
        for name in self.names:
            self.sinks.append(SINKS[name](self.out_dir, params, resume_step, ids.get(name)))
        ids = {n: s.run_id for n, s in zip(self.names, self.sinks[1:]) if s.run_id}
        if ids:
            ids_file.write_text(json.dumps(ids, indent=2) + "\n")

    def _each(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # a tracker must never stop training
                if isinstance(sink, JsonlSink):
                    raise
                log.warning("%s failed (%s: %s); it is dropped for the rest of this run",
                            type(sink).__name__, type(e).__name__, e)
                self.sinks.remove(sink)

    def log(self, record: dict[str, Any]) -> None:
        self._each("log", record)

    def finish(self, final: dict[str, Any], artifacts: list[Path]) -> None:
        """The run's final metrics (numbers only) and its artifact files (those that
        exist)."""
        numbers = {k: float(v) for k, v in flatten(final).items() if isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        self._each("finish", numbers, [Path(p) for p in artifacts if Path(p).is_file()])

    def close(self, status: str = "finished") -> None:
        self._each("close", status)
        self.sinks = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type | None, *exc: Any) -> None:
        """Close with the outcome: finished, killed (Ctrl-C, SIGTERM) or failed."""
        self.close("finished" if kind is None else
                   "killed" if issubclass(kind, KeyboardInterrupt) else "failed")
