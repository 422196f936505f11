"""Data parallel: `torchrun --nproc_per_node 2` gives the losses of one process with the same
global batch (same data and seed), and only rank 0 writes. Under FSDP (`parallelism: fsdp`)
too, with sharded checkpoints that resume exactly and load whole into one process."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lmkit
from lmkit import sharded
from lmkit.checkpoint import MANIFEST, SHARDED_INDEX, WEIGHTS
from lmkit.errors import CheckpointError, ConfigError
from lmkit.finetune.run import FinetuneConfig
from lmkit.train import TrainConfig, load_config, pretrain, read_metrics
from lmkit.train.distributed import DistEnv, init_distributed
from lmkit.train.options import read_config


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


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if r["split"] == "train"]


# Under torchrun: the FSDP run of the test, then the same run stopped at step 3 (a copy of it
# holding only the step-3 checkpoint) resumed to the end. One process group for both.
FSDP_SCRIPT = """
    import shutil, sys
    from pathlib import Path
    from lmkit.cli import main
    from lmkit.train.distributed import barrier, cleanup, init_distributed

    tmp, sets = Path(sys.argv[1]), sys.argv[2:]
    env = init_distributed("cpu")
    assert main(["pretrain", *sets]) == 0
    if env.is_main:
        stopped = shutil.copytree(tmp / "fsdp", tmp / "resumed")
        shutil.rmtree(stopped / "checkpoints" / "step-6")
        (stopped / "model.safetensors").unlink()
    barrier(env)
    assert main(["pretrain", "--resume", str(tmp / "resumed")]) == 0
    cleanup()
"""


def test_fsdp_matches_one_process_resumes_exactly_and_loads_whole(tmp_path):
    write_corpus(tmp_path / "corpus.txt")
    # 2 micro-batches of 1 row per process and step (gradients reduce-scattered after each),
    # keep-best (the best model gathered whole, then loaded back into the shards)
    fsdp = {**settings(tmp_path, "fsdp", batch_size=1), "steps": 6, "save_every": 3,
            "grad_accum": 2, "eval_every": 6, "best_metric": "loss", "keep_checkpoints": 0,
            "parallelism": "fsdp"}
    sets = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in fsdp.items()]
    script = tmp_path / "fsdp_run.py"
    script.write_text(textwrap.dedent(FSDP_SCRIPT))
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script),
                           str(tmp_path), *(a for s in sets for a in ("--set", s))],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = pretrain(load_config(None, {**fsdp, "out": str(tmp_path / "one"), "batch_size": 4,
                                      "grad_accum": 1, "parallelism": "ddp"}))

    # the same losses (and clipped gradient norms) as one process with the same global batch
    assert json.loads((tmp_path / "fsdp" / "compute.json").read_text())["world_size"] == 2
    records = [r for r in read_metrics(tmp_path / "fsdp") if r["split"] == "train"]
    single = [r for r in read_metrics(one) if r["split"] == "train"]
    assert len(records) == len(single) == 6
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in records] == pytest.approx([r[key] for r in single],
                                                          rel=1e-5, abs=1e-5)
    assert max(r["grad_norm"] for r in records) > 1.0  # so clipping (at 1.0) took part

    # a sharded checkpoint: every rank's shards and DCP's index, listed in the manifest
    step3 = tmp_path / "fsdp" / "checkpoints" / "step-3"
    files = set(json.loads((step3 / MANIFEST).read_text())["files"])
    assert {SHARDED_INDEX, "__0_0.distcp", "__1_0.distcp", "trainer_state.pt",
            "config.json"} <= files and WEIGHTS not in files
    assert sorted(p.name for p in step3.parent.iterdir()) == ["step-3", "step-6"]  # no staging

    # resumed at step 3, the run goes on exactly as the one never stopped
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "fsdp")

    # lmkit.load reads a sharded checkpoint whole into this process (no process group):
    # the last one equals the final model, gathered and saved whole, and one process's
    final = lmkit.load(tmp_path / "fsdp").state_dict()
    whole = lmkit.load(tmp_path / "fsdp" / "checkpoints" / "step-6")
    assert whole.tokenizer is not None
    resumed, single = (lmkit.load(run).state_dict() for run in (tmp_path / "resumed", one))
    for name, tensor in final.items():
        assert torch.equal(whole.state_dict()[name], tensor), name
        assert torch.equal(resumed[name], tensor), name
        assert torch.allclose(single[name], tensor, atol=1e-5), name


def test_sharded_folder_reads_whole_in_one_process_and_runs_no_pickled_code(tmp_path):
    weights = {"tokens.weight": torch.randn(6, 4), "norm.weight": torch.arange(4.0)}
    sharded.write({"model": weights, "optim": {"norm.weight": {"exp_avg": torch.ones(4)}}},
                  tmp_path / "ckpt")  # one process: every tensor whole
    assert sharded.is_sharded(tmp_path / "ckpt") and not sharded.is_sharded(tmp_path)
    read = sharded.read_whole(tmp_path / "ckpt")
    assert read.keys() == weights.keys()
    assert all(torch.equal(read[k], v) for k, v in weights.items())

    class Exploit:  # an index that would run a command when unpickled
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    (tmp_path / "ckpt" / SHARDED_INDEX).write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="system is not part of a checkpoint index"):
        sharded.read_whole(tmp_path / "ckpt")
    assert not (tmp_path / "ran").exists()


def test_parallelism_is_checked():
    with pytest.raises(ConfigError, match="parallelism='zero3': choose ddp"):
        TrainConfig(parallelism="zero3").validate()
    with pytest.raises(ConfigError, match="fine-tuning runs with parallelism ddp"):
        read_config(FinetuneConfig, None, {"parallelism": "fsdp", "train": "x"})


def test_single_process_environment_is_not_distributed(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert env == DistEnv() and env.is_main and not env.distributed
