"""What a run tells its user: warnings, the start-up summary, the dev metric, early stopping
and keep-best (with exact resume), the plot, and the trackers (a real MLflow store, W&B
offline)."""

import glob
import json
import logging
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import lmkit
from lmkit.finetune import FinetuneConfig, finetune
from lmkit.objectives import CausalLM
from lmkit.tokenizer import Tokenizer
from lmkit.train import TrainConfig, evaluate, read_metrics, train

GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "film", "was", "and", "very", "really", "plot", "cast", "it"]
QUIET = dict(progress=False, tensorboard=False, plot=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("feedback")
    rng = random.Random(0)

    def sentence(label):
        words = [rng.choice(FILLER) for _ in range(5)]
        words.insert(rng.randrange(6), rng.choice(GOOD if label == "pos" else BAD))
        return " ".join(words)

    docs = [" ".join(sentence(rng.choice(["pos", "neg"])) for _ in range(3)) for _ in range(200)]
    (d / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    for name, n in (("train", 240), ("dev", 60)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            rows.append(f"{sentence(label)}\t{label}")
        (d / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    tok = Tokenizer.train([d / "corpus.txt"], "wordpiece", 200, family="encoder")
    lmkit.Model(lmkit.preset("tiny-encoder", vocab_size=tok.vocab_size, pad_id=tok.pad_id)
                ).save(d / "enc", tokenizer=tok)
    return d


def tune(data, out, **kw):
    cfg = dict(task="classification", train=str(data / "train.tsv"), dev=str(data / "dev.tsv"),
               out=str(out), lr=3e-3, batch_size=16, precision="fp32", **QUIET)
    return finetune(data / "enc", FinetuneConfig(**{**cfg, **kw}))


def rows(n=4, vocab=200):
    g = torch.Generator().manual_seed(n)
    return [CausalLM()({"input_ids": torch.randint(5, vocab, (2, 16), generator=g)})
            for _ in range(n)]


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ---- warnings ---------------------------------------------------------------------------------


def test_warmup_longer_than_the_run_warns_and_a_three_step_run_is_plotted(tmp_path, caplog):
    model = lmkit.Model(lmkit.preset("tiny-decoder", vocab_size=200))
    train(model, rows(), TrainConfig(steps=3, batch_size=2, warmup_steps=5, eval_every=1,
                                     **{**QUIET, "plot": True}), tmp_path / "a",
          eval_batches=rows(1))
    assert any("warmup_steps=5 >= steps=3: the whole run is warmup" in m
               for m in warnings_of(caplog))
    plot = tmp_path / "a" / "loss.png"
    assert plot.stat().st_size > 5000  # axes, labels, markers: a real figure
    assert [r["step"] for r in read_metrics(tmp_path / "a") if r["split"] == "train"] == \
        [1, 2, 3]  # log_every -1: every step of a short run, not one averaged point
    caplog.clear()
    train(model, rows(), TrainConfig(steps=3, batch_size=2, warmup_steps=1, **QUIET),
          tmp_path / "b")
    assert not warnings_of(caplog)


def test_a_vocabulary_smaller_than_asked_is_explained(data, caplog):
    Tokenizer.train([data / "corpus.txt"], "bpe", 8000, family="decoder")
    [message] = warnings_of(caplog)
    got = len(json.loads(Tokenizer.train([data / "corpus.txt"], "bpe", 8000).backend.to_str())
              ["model"]["vocab"])
    assert f"has {got:,} tokens, fewer than the 8,000 asked" in message
    assert "200 documents" in message and "min_frequency=2" in message
    caplog.clear()
    Tokenizer.train([data / "corpus.txt"], "bpe", 280, family="decoder")
    assert not warnings_of(caplog)


def test_a_tiny_dev_set_warns(data, tmp_path, caplog):
    tune(data, tmp_path / "small", steps=1, dev_limit=20)
    assert any("the dev set has only 20 examples: its score is noisy" in m
               for m in warnings_of(caplog))
    caplog.clear()
    tune(data, tmp_path / "full", steps=1)  # 60 examples
    assert not any("dev set" in m for m in warnings_of(caplog))


def test_startup_summary_and_warnings_in_the_cli_and_the_python_api(data, tmp_path):
    """Both faces print them with no logging set up by the program."""
    proc = subprocess.run(
        [sys.executable, "-m", "lmkit.cli", "finetune", str(data / "enc"), "--task",
         "classification", "--train", str(data / "train.tsv"), "--dev", str(data / "dev.tsv"),
         "--out", str(tmp_path / "cli"), "--steps", "3", "--batch-size", "16", "--precision",
         "fp32", "--eval-every", "3", "--set", "warmup_steps=3", "--set", "progress=false",
         "--report-to", "none"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    summary = err[err.index("[lmkit] training run"):]
    counts = lmkit.load(tmp_path / "cli").num_parameters()
    for line in ["model        " + str(data / "enc") + " (encoder, classification head, full",
                 f"{counts:,} parameters, {counts:,} trainable (100%)",
                 "new tensors  head.proj.bias, head.proj.weight",
                 "data         train 240 examples (", "dev 60 examples",
                 "precision fp32 (asked: fp32)", "steps        3 (warmup 3, linear schedule",
                 "batch 16 x 1 accumulation x 1 process, ~", "tokens per step",
                 "evaluation   every 3 steps",
                 f"output       {tmp_path / 'cli'} (records: metrics.jsonl)"]:
        assert line in summary, (line, summary)
    assert "[lmkit] warning: warmup_steps=3 >= steps=3" in err
    assert err.index("warmup_steps=3") < err.index("training run")

    script = textwrap.dedent(f"""
        from lmkit.train import load_config, pretrain
        corpus = [{str(data / "corpus.txt")!r}]
        pretrain(load_config(None, {{"preset": "tiny-decoder", "data": corpus,
                 "tokenizer": "bpe:8000", "steps": 2, "seq_len": 16, "batch_size": 2,
                 "out": {str(tmp_path / "api")!r}, "progress": False, "report_to": ["none"],
                 "eval_every": 2}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[lmkit] warning: the bpe tokenizer has" in proc.stderr
    assert "fewer than the 8,000 asked" in proc.stderr
    assert "[lmkit] warning: warmup_steps=100 >= steps=2" in proc.stderr
    assert "[lmkit] training run" in proc.stderr
    assert "tiny-decoder (decoder, causal objective)" in proc.stderr
    assert "~32 tokens per step" in proc.stderr  # 2 rows x 16 tokens
    assert "validation " in proc.stderr and "tokens in" in proc.stderr


# ---- keep-best and early stopping -------------------------------------------------------------


def test_early_stopping_stops_at_the_right_evaluation_and_keeps_the_best(data, tmp_path):
    res = tune(data, tmp_path / "run", steps=150, eval_every=3, patience=3,
               best_metric="accuracy", **{**QUIET, "plot": True})
    evals = [r for r in read_metrics(res.out_dir) if r["split"] == "valid"]
    values = [r["accuracy"] for r in evals]
    best = values.index(max(values))  # the first of the best: a tie is no improvement
    assert res.steps < 150 and res.steps == evals[best]["step"] + 3 * 3
    assert evals[-1]["step"] == res.steps and len(evals) == best + 4
    assert res.best == {"metric": "accuracy", "value": max(values), "step": evals[best]["step"]}
    assert res.metrics["accuracy"] == max(values)  # the final model is the best one
    saved = json.loads((res.out_dir / "eval.json").read_text())
    assert saved["best"] == res.best and saved["accuracy"] == max(values)
    assert f"step {res.best['step']}" in saved["final_model"]
    assert "best evaluation" in (res.out_dir / "README.md").read_text()
    assert not (res.out_dir / "best").exists()  # the final model replaced it
    assert (res.out_dir / "loss.png").stat().st_size > 5000


def test_keep_best_resumes_exactly(tmp_path):
    """Stopped halfway and resumed, a keep-best run ends with the same final model and the
    same best as one that ran straight; that model's dev loss is the best one logged."""
    valid = rows(2)

    def run(out, **kw):
        torch.manual_seed(0)
        model = lmkit.Model(lmkit.preset("tiny-decoder", vocab_size=200))
        cfg = TrainConfig(steps=12, batch_size=2, lr=3e-2, warmup_steps=0, eval_every=2,
                          save_every=2, best_metric="loss", **QUIET)
        return model, train(model, _stream(), cfg, out, eval_batches=valid, **kw)

    model, straight = run(tmp_path / "straight")
    _, half = run(tmp_path / "resumed", max_steps=5)
    assert half.stopped == "max_steps" and (tmp_path / "resumed" / "best").is_dir()
    again, resumed = run(tmp_path / "resumed", resume=True)
    assert resumed.best == straight.best
    losses = [e["loss"] for e in straight.evals]
    assert straight.best["value"] == min(losses)
    assert straight.best["step"] < 12, "pick settings where the best is not the last step"
    for (name, x), y in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(x, y), name
    assert evaluate(lmkit.load(tmp_path / "resumed"), valid, "fp32")["loss"] == \
        pytest.approx(straight.best["value"], abs=1e-6)


def _stream():
    """A resumable stream of fixed random rows (exact resume needs state_dict)."""
    class Rows:
        def __init__(self):
            self.i = 0
            self.rows = rows(64)

        def __iter__(self):
            while True:
                self.i += 1
                yield self.rows[(self.i - 1) % len(self.rows)]

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, state):
            self.i = state["i"]

    return Rows()


# ---- trackers ---------------------------------------------------------------------------------


def test_mlflow_records_params_metrics_and_artifacts(data, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "feedback-test")
    MlflowClient(uri).create_experiment(  # artifacts in tmp_path, not the working folder
        "feedback-test", artifact_location=(tmp_path / "artifacts").as_uri())
    res = tune(data, tmp_path / "tracked", steps=4, eval_every=2, report_to=["mlflow"],
               **{**QUIET, "plot": True})
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("feedback-test")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["lr"] == "0.003" and run.data.params["task"] == "classification"
    assert run.data.params["trainable_parameters"] == str(res.trainable)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    logged = [r for r in read_metrics(res.out_dir) if r["split"] == "train"]
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in logged]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "valid/accuracy")] == \
        [0, 2, 4]
    assert {"train/lr", "train/tokens_per_s", "valid/loss"} <= set(run.data.metrics)
    assert run.data.metrics["final/dev.accuracy"] == pytest.approx(res.metrics["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "eval.json", "finetune_config.yaml", "compute.json"} <= artifacts


def test_wandb_offline_run_holds_the_metrics(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    res = tune(data, tmp_path / "tracked", steps=3, eval_every=3, report_to=["wandb"])
    wandb.teardown()  # the service process writes the run file behind run.finish()
    [file] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    with open(file, "rb") as f:
        raw = f.read()
    for record in read_metrics(res.out_dir):
        split = record["split"]
        for key in ("loss", "lr", "accuracy"):
            if key in record:  # the key and its value, as W&B serialises them (JSON)
                assert f"{split}/{key}".encode() in raw
                assert json.dumps(record[key]).encode() in raw
    assert b"final/dev.accuracy" in raw and b"eval.json" in raw
    ids = json.loads((res.out_dir / "trackers.json").read_text())
    assert ids["wandb"] in file  # a resume continues this run


def test_tracker_names_are_checked():
    with pytest.raises(ValueError, match="report_to=\\['neptune'\\] is not supported"):
        TrainConfig(report_to=["neptune"]).validate()
    with pytest.raises(ValueError, match="give dev data"):
        TrainConfig(patience=2).check_keep_best(has_dev=False)
