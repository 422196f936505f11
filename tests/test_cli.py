"""The `lmkit` command, run as a real process: pretrain -> generate -> resume, convert to
Hugging Face and back, finetune -> evaluate -> predict, and clear one-line errors."""

import dataclasses
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
    proc = lmkit_cli("generate", out, "--prompt", "the film", "--prompt", "a plot",
                     "--max-new-tokens", "6", "--sample", "--n-best", "3", "--seed", "2",
                     cwd=data)  # 3 samples per prompt, each with its score
    lines = proc.stdout.splitlines()
    assert [line[:len(p)] for line, p in zip(lines, ["the film"] * 3 + ["a plot"] * 3)] == \
        ["the film"] * 3 + ["a plot"] * 3 and len(lines) == 6
    assert all("[score -" in line for line in lines)
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

    # From standard input ('-'), one text per line, and from a JSON-lines file to --output.
    proc = subprocess.run([sys.executable, "-m", "lmkit.cli", "predict", str(out), "-"],
                          input="the film was great\n\nit was awful\n", capture_output=True,
                          text=True, timeout=300, cwd=data)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.splitlines()] == predictions
    (data / "in.jsonl").write_text('{"id": 7, "text": "the film was great"}\n'
                                   '{"id": 8, "text": "it was awful"}\n')
    lmkit_cli("predict", out, "--input", data / "in.jsonl", "--output", data / "out.jsonl",
              cwd=data)
    rows = [json.loads(line) for line in (data / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prediction"]) for r in rows] == [
        (7, predictions[0]["prediction"]), (8, predictions[1]["prediction"])]
    proc = lmkit_cli("predict", out, "--input", data / "in.jsonl", "--field", "sentence",
                     cwd=data, ok=False)
    assert proc.returncode == 2 and "in.jsonl:1: no text field 'sentence'" in proc.stderr


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


def test_help_needs_no_torch(tmp_path):
    """`lmkit --help` and every sub-command's --help build the parser without torch."""
    script = """
import sys
from lmkit.cli import COMMANDS, main
for argv in (["--help"], ["--version"], *([name, "--help"] for name in COMMANDS)):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, argv
heavy = [m for m in ("torch", "numpy", "tokenizers", "safetensors", "lmkit.model")
         if m in sys.modules]
assert not heavy, heavy
print(len(COMMANDS))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.splitlines()[-1]) >= 7
    assert "usage: lmkit" in proc.stdout and "fill-mask" in proc.stdout  # --task lists it
    assert "options.\n" in proc.stdout  # the description ends its sentence


def test_version_list_and_help_config(tmp_path):
    assert lmkit_cli("--version", cwd=tmp_path).stdout.strip() == f"lmkit {lmkit.__version__}"
    listed = json.loads(lmkit_cli("info", "--list", cwd=tmp_path).stdout)
    assert set(listed["presets"]) == set(lmkit.PRESETS)
    assert "fill-mask" in listed["tasks"] and "lora" in listed["schemes"]
    assert {"llama", "bert", "t5", "gpt2"} <= set(listed["hugging_face_model_types"])
    assert "classification" in listed["heads"] and "span" in listed["objectives"]

    text = lmkit_cli("finetune", "--help-config", cwd=tmp_path).stdout
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")
            and not line.startswith("     ")}
    from lmkit.cli import FINETUNE_CONFIG, PRETRAIN_CONFIG, config_fields
    from lmkit.finetune.run import FinetuneConfig
    from lmkit.train.pretrain import PretrainConfig

    assert set(rows) == {f.name for f in dataclasses.fields(FinetuneConfig)}
    for cls, path in ((FinetuneConfig, FINETUNE_CONFIG), (PretrainConfig, PRETRAIN_CONFIG)):
        fields = config_fields(path)  # read from the source: the same types and defaults
        for f in dataclasses.fields(cls()):
            if f.name != "model":
                default = f.default if f.default_factory is dataclasses.MISSING \
                    else f.default_factory()
                assert fields[f.name][:2] == (f.type, repr(default)), f.name
    model = {f.name: repr(f.default if f.default_factory is dataclasses.MISSING
                          else f.default_factory()) for f in dataclasses.fields(lmkit.ModelConfig)}
    assert {k: v[1] for k, v in config_fields(PRETRAIN_CONFIG).items()
            if k.startswith("model.")} == {f"model.{k}": v for k, v in model.items()}
    assert rows["lora_rank"].split() == ["lora_rank", "int", "=", "8"]
    assert "cosine | linear | constant" in text  # the field's comment is its help
    text = lmkit_cli("pretrain", "--help-config", cwd=tmp_path).stdout
    assert "model.hidden_size" in text and "objective" in text
    assert len([f for f in dataclasses.fields(PretrainConfig)]) < text.count("\n  ")


def test_cli_names_are_the_tables_keys():
    from lmkit import names
    from lmkit.finetune import SCHEMES
    from lmkit.tasks import TASKS
    from lmkit.train.pretrain import OBJECTIVES

    assert tuple(TASKS) == names.TASKS and names.SCHEMES == SCHEMES
    assert ("auto", *OBJECTIVES) == names.OBJECTIVES


# A meta-path finder that makes the optional packages look uninstalled.
_BLOCKED = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"sacrebleu", "seqeval", "rouge_score", "matplotlib", "gguf"}:
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Blocker())
import lmkit.tasks, lmkit.train, lmkit.loading  # no optional package at import time
from lmkit.errors import MissingExtra
from lmkit.tasks import bleu, chrf, entity_scores, rouge
from lmkit.train.metrics import plot_curves
from lmkit.convert.gguf import load_gguf
import json, pathlib
run = pathlib.Path(sys.argv[1])
(run / "x.gguf").write_bytes(b"GGUF" + bytes(60))
(run / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\\n")
for call in (lambda: bleu(["a"], ["a"]), lambda: chrf(["a"], ["a"]),
             lambda: entity_scores([["O"]], [["O"]]), lambda: rouge(["a"], ["a"]),
             lambda: plot_curves(run), lambda: load_gguf(run / "x.gguf")):
    try:
        call()
    except MissingExtra as e:
        print(e)
"""


def test_missing_extras_are_named(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _BLOCKED, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert [line.split("pip install ")[1] for line in lines] == \
        ["'lmkit[metrics]' (or 'lmkit[all]')"] * 4 + ["'lmkit[plots]' (or 'lmkit[all]')",
                                                     "'lmkit[gguf]' (or 'lmkit[all]')"]
    assert lines[0].startswith("BLEU needs the optional package 'sacrebleu'")
    assert lines[5].startswith("reading GGUF files needs the optional package 'gguf'")
