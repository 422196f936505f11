"""Data parallel: `torchrun --nproc_per_node 2` gives the losses of one process with the same
global batch (same data and seed), and only rank 0 writes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmkit.train import load_config, pretrain, read_metrics
from lmkit.train.distributed import DistEnv, init_distributed


def write_corpus(path: Path) -> None:
    lines = ["the king said to the queen that the lord of the house ran far away",
             "a red dog sat on the mat and the cat sat on the big tree",
             "thou art the lord of this house and I am the king of the land"]
    docs = ["\n".join(lines[(i + j) % 3] for j in range(1 + i % 3)) for i in range(60)]
    path.write_text("\n\n".join(docs) + "\n")


def settings(tmp: Path, out: str, batch_size: int) -> dict:
    return {"preset": "tiny-decoder", "data": [str(tmp / "corpus.txt")], "tokenizer": "bpe:300",
            "out": str(tmp / out), "steps": 5, "seq_len": 32, "batch_size": batch_size,
            "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 5, "save_every": 5,
            "valid_fraction": 0.1, "progress": False, "tensorboard": False, "plot": False,
            "precision": "fp32"}  # torchrun processes see the real CPU, where auto may be bf16


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    write_corpus(tmp_path / "corpus.txt")
    # the same command as a single run: `torchrun ... -m lmkit.cli pretrain --set ...`
    sets = [f"{k}={','.join(v) if isinstance(v, list) else v}"
            for k, v in settings(tmp_path, "two", batch_size=2).items()]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m",
                           "lmkit.cli", "pretrain", *(a for s in sets for a in ("--set", s))],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    pretrain(load_config(None, settings(tmp_path, "one", batch_size=4)))

    one = [r["loss"] for r in read_metrics(tmp_path / "one") if r["split"] == "train"]
    two = [r["loss"] for r in read_metrics(tmp_path / "two") if r["split"] == "train"]
    assert len(one) == len(two) == 5  # rank 1 wrote no metrics of its own
    assert two == pytest.approx(one, rel=1e-5, abs=1e-5)
    assert (tmp_path / "two" / "model.safetensors").exists()
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-5"]


def test_single_process_environment_is_not_distributed(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert env == DistEnv() and env.is_main and not env.distributed
