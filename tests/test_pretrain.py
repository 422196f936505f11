"""pretrain(): text files -> tokenizer -> token cache -> objective -> model -> checkpoint."""

import json
from pathlib import Path

import pytest
import yaml

import lmkit
from lmkit.train import PretrainConfig, load_config, parse_set, pretrain, read_metrics, resume

SENTENCES = ["the king said to the queen that the lord of the house ran far away",
             "a red dog sat on the mat and the cat sat on the big tree",
             "thou art the lord of this house and I am the king of the land",
             "the queen ran to the tree and the dog ran after the cat"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    docs = ["\n".join(SENTENCES[(i + j) % 4] for j in range(1 + i % 3)) for i in range(60)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def config(corpus: Path, out: Path, **kw) -> PretrainConfig:
    base = {"data": [str(corpus)], "out": str(out), "steps": 12, "seq_len": 32,
            "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 6, "save_every": 6,
            "log_every": 1, "valid_fraction": 0.1, "progress": False, "tensorboard": False,
            "plot": False}
    return load_config(None, {**base, **kw})


@pytest.mark.parametrize("preset, tokenizer, objective", [
    ("tiny-decoder", "bpe:300", "auto"),
    ("tiny-encoder", "wordpiece:300", "auto"),
    ("tiny-seq2seq", "unigram:300", "auto"),
    ("tiny-seq2seq", "bpe:400", "infilling"),
    ("tiny-decoder", "char", "auto"),  # nanoGPT's character-level recipe
])
def test_pretrain_end_to_end(preset, tokenizer, objective, corpus, tmp_path):
    out = pretrain(config(corpus, tmp_path / "run", preset=preset, tokenizer=tokenizer,
                          objective=objective))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl",
                 "compute.json", "pretrain_config.yaml"):
        assert (out / name).exists(), name
    assert (out / "checkpoints" / "step-12" / "trainer_state.pt").exists()
    records = read_metrics(out)
    train = [r["loss"] for r in records if r["split"] == "train"]
    valid = [r["loss"] for r in records if r["split"] == "valid"]
    assert len(train) == 12 and len(valid) == 3
    assert valid[-1] < valid[0]  # it learned something
    model = lmkit.load(out)
    tok = model.tokenizer
    assert model.config.vocab_size == tok.vocab_size
    assert model.config.pad_id == tok.pad_id
    assert model.config.family == lmkit.preset(preset).family
    if model.config.family == "decoder":
        gen = lmkit.generate(model, "the king", max_new_tokens=5)
        assert len(gen.sequences[0]) >= 1 and isinstance(gen.texts[0], str)
    if model.config.family == "encoder-decoder":
        expected_start = tok.eos_id if objective == "infilling" else tok.pad_id
        assert model.config.decoder_start_id == expected_start
    assert json.loads((out / "compute.json").read_text())["flops"] > 0


def test_resume_continues_a_run(corpus, tmp_path):
    out = pretrain(config(corpus, tmp_path / "run", steps=6, save_every=3))
    with pytest.raises(ValueError, match="already holds a run"):
        pretrain(config(corpus, tmp_path / "run", steps=6))
    resume(out, {"steps": 9})
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == list(range(1, 10))
    saved = yaml.safe_load((out / "pretrain_config.yaml").read_text())
    assert saved["steps"] == 9 and saved["data"] == [str(corpus.resolve())]
    assert json.loads((out / "compute.json").read_text())["sessions"] == 2


def test_pretrain_with_an_existing_tokenizer(corpus, tmp_path):
    first = pretrain(config(corpus, tmp_path / "a", steps=2, eval_every=0))
    out = pretrain(config(corpus, tmp_path / "b", steps=2, eval_every=0,
                          tokenizer=str(first / "tokenizer.json")))
    assert lmkit.load(out).tokenizer.vocab_size == lmkit.load(first).tokenizer.vocab_size


# ---- configuration -----------------------------------------------------------------------------


def test_load_config_yaml_then_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("LMKIT_TEST_DATA", "/data")
    file = tmp_path / "cfg.yaml"
    file.write_text("preset: tiny-encoder\nlr: 1.0e-3\nsteps: 50\nmodel:\n  hidden_size: 32\n"
                    "valid_data: [$LMKIT_TEST_DATA/v.txt]\n")
    cfg = load_config(file, {"steps": 70, "data": "a.txt,b.txt", "tokenizer": None,
                             **parse_set(["lr=2e-4", "model.num_heads=2", "precision=bf16",
                                          "text_field=none", "tensorboard=false"])})
    assert cfg.preset == "tiny-encoder" and cfg.steps == 70 and cfg.lr == 2e-4
    assert cfg.data == ["a.txt", "b.txt"] and cfg.tokenizer == "bpe:8000"
    assert cfg.model == {"hidden_size": 32, "num_heads": 2}
    assert cfg.precision == "bf16" and cfg.text_field is None and cfg.tensorboard is False
    assert cfg.valid_data == ["/data/v.txt"]


@pytest.mark.parametrize("overrides, error, match", [
    ({"stpes": 3}, ValueError, "unknown PretrainConfig field"),
    ({"model.hidden": 3}, ValueError, "unknown PretrainConfig.model field"),
    ({"steps": "many"}, ValueError, "steps='many' is not an integer"),
    ({"precision": "fp8"}, ValueError, "precision"),
    ({"objective": "magic"}, ValueError, "objective"),
])
def test_bad_config_values(overrides, error, match):
    with pytest.raises(error, match=match):
        load_config(None, overrides)
    with pytest.raises(ValueError, match="key=value"):
        parse_set(["lr"])


# ---- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(corpus, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no text"):
        pretrain(config(empty, tmp_path / "r1"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrain(config(tmp_path / "missing.txt", tmp_path / "r2"))
    with pytest.raises(ValueError, match="no training data"):
        pretrain(load_config(None, {"out": str(tmp_path / "r3")}))
    with pytest.raises(ValueError, match="max_positions=256"):
        pretrain(config(corpus, tmp_path / "r4", seq_len=300))
    with pytest.raises(FileNotFoundError, match="neither a spec"):
        pretrain(config(corpus, tmp_path / "r5", tokenizer="bpe-8000"))
    with pytest.raises(ValueError, match="is for encoder-decoder models"):
        pretrain(config(corpus, tmp_path / "r6", objective="span"))
    with pytest.raises(ValueError, match="unknown preset"):
        pretrain(config(corpus, tmp_path / "r7", preset="tiny-gpt"))
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        pretrain(config(corpus, tmp_path / "r8", seq_len=250, batch_size=64))
    with pytest.raises(ValueError, match="validation data is too small"):
        pretrain(config(corpus, tmp_path / "r9", seq_len=250, valid_fraction=0.02))
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        resume(tmp_path / "nowhere")
