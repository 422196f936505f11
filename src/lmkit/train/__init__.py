"""Training: the loop, optimizer and schedule, checkpoints and exact resume, metrics and
compute accounting, data-parallel runs under torchrun, and the pretraining entry point."""

from lmkit.data.batches import BatchStream, fixed_batches
from lmkit.train.distributed import DistEnv, cleanup, init_distributed
from lmkit.train.loop import (
                              TrainConfig,
                              TrainingDiverged,
                              TrainingInterrupted,
                              TrainResult,
                              evaluate,
                              train,
)
from lmkit.train.metrics import plot_curves, read_metrics
from lmkit.train.optim import build_optimizer, build_scheduler, param_groups
from lmkit.train.options import parse_set
from lmkit.train.pretrain import PretrainConfig, load_config, pretrain, resume
from lmkit.train.state import latest_checkpoint, list_checkpoints
from lmkit.train.trackers import Trackers

__all__ = ["BatchStream", "DistEnv", "PretrainConfig", "TrainConfig", "TrainResult",
           "Trackers", "TrainingDiverged", "TrainingInterrupted", "build_optimizer",
           "build_scheduler", "cleanup", "evaluate", "fixed_batches", "init_distributed",
           "latest_checkpoint", "list_checkpoints", "load_config", "param_groups", "parse_set",
           "plot_curves", "pretrain", "read_metrics", "resume", "train"]
