"""The `lmkit` command, run as a real process: pretrain -> generate -> resume, convert to
Hugging Face and back, finetune -> evaluate -> predict, and clear one-line errors."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmkit

GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "film", "was", "and", "very", "really", "plot", "cast", "it"]


def lmkit_cli(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    """Run `lmkit ARGS` in a new Python process (the console script's entry point)."""
    proc = subprocess.run([sys.executable, "-m", "lmkit.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    rng = random.Random(0)

    def sentence(label: str) -> str:
        words = [rng.choice(FILLER) for _ in range(5)]
        words.insert(rng.randrange(6), rng.choice(GOOD if label == "pos" else BAD))
        return " ".join(words)

    docs = [" ".join(sentence(rng.choice(["pos", "neg"])) for _ in range(3)) for _ in range(200)]
    (d / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    for name, n in (("train", 240), ("dev", 40)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            rows.append(f"{sentence(label)}\t{label}")
        (d / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    return d


@pytest.fixture(scope="module")
def pretrained(data) -> Path:
    """`lmkit pretrain` of a tiny encoder (masked LM, WordPiece), stopped and resumed."""
    out = data / "enc"
    common = ["--preset", "tiny-encoder", "--data", data / "corpus.txt", "--tokenizer",
              "wordpiece:200", "--seq-len", "32", "--batch-size", "8", "--out", out,
              "--set", "progress=false", "--set", "tensorboard=false", "--set", "plot=false",
              "--set", "save_every=5", "--set", "eval_every=5", "--set", "warmup_steps=2",
              "--set", "log_every=1"]
    lmkit_cli("pretrain", *common, "--steps", "5", cwd=data)
    first = lmkit.load(out)
    assert first.config.family == "encoder" and first.tokenizer is not None
    proc = lmkit_cli("pretrain", "--resume", out, "--steps", "10", cwd=data)
    assert "model saved" in proc.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().split("\n")
             if line and json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 11))  # resumed at 6, not restarted
    return out


def test_pretrain_generate_and_resume(data):
    out = data / "dec"
    lmkit_cli("pretrain", "--preset", "tiny-decoder", "--data", data / "corpus.txt",
              "--tokenizer", "bpe:300", "--steps", "8", "--seq-len", "32", "--out", out,
              "--set", "progress=false", "--set", "model.hidden_size=32", cwd=data)
    assert lmkit.load(out).config.hidden_size == 32
    proc = lmkit_cli("generate", out, "--prompt", "the film", "--max-new-tokens", "5",
                     "--sample", "--seed", "1", "--top-k", "5", cwd=data)
    assert proc.stdout.startswith("the film")
    proc = lmkit_cli("pretrain", "--preset", "tiny-decoder", "--data", data / "corpus.txt",
                     "--out", out, cwd=data, ok=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_convert_to_hf_and_back(pretrained, data):
    hf_dir, back = data / "hf", data / "back"
    lmkit_cli("convert", pretrained, hf_dir, "--to", "hf", cwd=data)
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "bert"
    lmkit_cli("convert", hf_dir, back, "--to", "lmkit", cwd=data)
    ours, again = lmkit.load(pretrained).eval(), lmkit.load(back).eval()
    ids = torch.randint(5, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_finetune_evaluate_predict(pretrained, data):
    out = data / "cls"
    proc = lmkit_cli("finetune", pretrained, "--task", "classification", "--train",
                     data / "train.tsv", "--dev", data / "dev.tsv", "--out", out, "--steps",
                     "60", "--lr", "3e-3", "--batch-size", "16", "--set", "progress=false",
                     "--set", "layer_decay=0.9", cwd=data)
    report = json.loads(proc.stdout)
    assert report["dev"]["accuracy"] > 80
    scored = json.loads(lmkit_cli("evaluate", out, "--data", data / "dev.tsv", cwd=data).stdout)
    assert scored["accuracy"] == pytest.approx(report["dev"]["accuracy"])
    proc = lmkit_cli("predict", out, "the film was great", "it was awful", cwd=data)
    predictions = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [p["prediction"]["label"] for p in predictions] == ["pos", "neg"]
    assert all(0.5 < p["prediction"]["score"] <= 1 for p in predictions)


def test_errors_are_one_clear_line(pretrained, data):
    bad = data / "bad_dev.tsv"
    bad.write_text("sentence\tlabel\nthe film was good\tpos\nthe plot was meh\tmeh\n")
    proc = lmkit_cli("evaluate", data / "cls", "--data", bad, cwd=data, ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "bad_dev.tsv:3" in proc.stderr and "meh" in proc.stderr
    proc = lmkit_cli("finetune", pretrained, "--task", "translation", "--train",
                     data / "train.tsv", "--out", data / "mt", cwd=data, ok=False)
    assert proc.returncode == 2 and "encoder" in proc.stderr
    proc = lmkit_cli("pretrain", "--preset", "tiny-decoder", "--data", data / "nope.txt",
                     "--out", data / "x", cwd=data, ok=False)
    assert proc.returncode == 2 and "nope.txt" in proc.stderr
    proc = lmkit_cli("pretrain", "--preset", "tiny-decoder", "--set", "lr", cwd=data,
                     ok=False)
    assert proc.returncode == 2 and "key=value" in proc.stderr
