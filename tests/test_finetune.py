"""Fine-tuning end to end on tiny synthetic tasks: each must be learned well above chance,
through the same functions the CLI calls."""

import json
import random
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import lmkit
from lmkit.finetune import (
    FinetuneConfig,
    LoRAConfig,
    apply_scheme,
    evaluate_run,
    finetune,
    pipeline,
)
from lmkit.flops import flops_per_token
from lmkit.tasks import DataError, bleu, read_classification, read_seq2seq
from lmkit.tokenizer import Tokenizer
from lmkit.train import latest_checkpoint, read_metrics

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo"]
FILLER = ["the", "a", "today", "saw", "went", "to", "and", "with", "very", "really", "was"]
GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "sad"]
WORDS = NAMES + CITIES + FILLER
LEXICON = {w: WORDS[(i + 1) % len(WORDS)] for i, w in enumerate(WORDS)}  # word-for-word


def sentence(rng, n=6):
    return " ".join(rng.choice(FILLER) for _ in range(n))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    corpus = [sentence(rng) + " " + " ".join(rng.sample(NAMES + CITIES + GOOD + BAD, 3))
              for _ in range(400)] + list(LEXICON.values())
    (d / "corpus.txt").write_text("\n\n".join(corpus))

    def cls_rows(n):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            word = rng.choice(GOOD if label == "pos" else BAD)
            words = sentence(rng, 5).split()
            words.insert(rng.randrange(6), word)
            rows.append(" ".join(words) + "\t" + label)
        return "\n".join(rows) + "\n"
    (d / "cls_train.tsv").write_text(cls_rows(300))
    (d / "cls_dev.tsv").write_text(cls_rows(60))

    def ner_rows(n):
        out = []
        for _ in range(n):
            words = sentence(rng, 4).split()
            tags = ["O"] * 4
            for entity, kind in ((rng.choice(NAMES), "PER"), (rng.choice(CITIES), "LOC")):
                at = rng.randrange(len(words) + 1)
                words.insert(at, entity)
                tags.insert(at, "B-" + kind)
            out.append("\n".join(f"{w} X X {t}" for w, t in zip(words, tags)))
        return "-DOCSTART- -X- -X- O\n\n" + "\n\n".join(out) + "\n"
    (d / "ner_train.txt").write_text(ner_rows(300))
    (d / "ner_dev.txt").write_text(ner_rows(50))

    def mt_rows(n):
        rows = []
        for _ in range(n):
            src = [rng.choice(list(LEXICON)) for _ in range(rng.randint(2, 4))]
            rows.append(" ".join(src) + "\t" + " ".join(LEXICON[w] for w in src))
        return "\n".join(rows) + "\n"
    (d / "mt_train.tsv").write_text(mt_rows(600))
    (d / "mt_dev.tsv").write_text(mt_rows(30))
    gen = [{"prompt": f"{n} lives in", "completion": f" {c}"}
           for n, c in zip(NAMES, CITIES)] * 8
    (d / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in gen) + "\n")
    return d


def pretrained(tmp_path_factory, data, preset, kind, family, **over):
    """A tiny 'pretrained' checkpoint with a tokenizer trained on the corpus."""
    out = tmp_path_factory.mktemp(preset)
    size = 400 if kind == "bpe" else 200  # byte-level BPE starts from 256 bytes
    tok = Tokenizer.train([data / "corpus.txt"], kind, size, family=family)
    cfg = lmkit.preset(preset, vocab_size=tok.vocab_size, pad_id=tok.pad_id,
                       eos_id=tok.eos_id if family != "encoder" else None, **over)
    torch.manual_seed(0)  # the same weights whichever test (or xdist worker) builds it first
    model = lmkit.Model(cfg)
    model.save(out, tokenizer=tok)
    return out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, data):
    return pretrained(tmp_path_factory, data, "tiny-encoder", "wordpiece", "encoder")


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory, data):
    # BART-style learned positions: T5's relative scheme gives cross-attention no position
    # signal, which a model this small does not learn to align in a few hundred steps.
    return pretrained(tmp_path_factory, data, "tiny-seq2seq", "bpe", "encoder-decoder",
                      decoder_start_id=0, position="learned", norm="layernorm",
                      scale_attention=True, output_scale=1.0)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory, data):
    return pretrained(tmp_path_factory, data, "tiny-decoder", "bpe", "decoder", bos_id=None)


def run(tmp_path, checkpoint, **kw):
    cfg = FinetuneConfig(out=str(tmp_path / "run"), progress=False, tensorboard=False,
                         plot=False, **kw)
    return finetune(checkpoint, cfg)


@pytest.mark.parametrize("scheme", ["full", "lora"])
def test_classification(tmp_path, data, encoder, scheme):
    epochs, lr = (2, 2e-3) if scheme == "full" else (3, 5e-3)  # LoRA learns at a higher lr
    res = run(tmp_path, encoder, task="classification", train=str(data / "cls_train.tsv"),
              dev=str(data / "cls_dev.tsv"), epochs=epochs, lr=lr, batch_size=16, scheme=scheme,
              lora_rank=4, lora_targets=["q", "k", "v", "o", "up", "down"])
    assert res.new_tensors == ["head.proj.bias", "head.proj.weight"]
    assert res.metrics["accuracy"] > 85, res.metrics
    if scheme == "lora":
        assert res.trainable < res.total / 3
        assert (res.out_dir / "adapter" / "adapter.safetensors").exists()
    # the dev loss is near 0 here: an absolute tolerance as well as the relative one
    assert evaluate_run(res.out_dir, data / "cls_dev.tsv") == pytest.approx(res.metrics,
                                                                           abs=1e-6)
    clf = pipeline(None, res.out_dir)
    one = clf("the lovely day with alice")
    assert one["label"] in ("neg", "pos") and set(one["scores"]) == {"neg", "pos"}
    assert one["score"] == max(one["scores"].values()) and sum(one["scores"].values()) == \
        pytest.approx(1)
    dev = read_classification(data / "cls_dev.tsv")
    preds = clf([e.text for e in dev])  # the pipeline agrees with the reported accuracy
    hits = sum(p["label"] == e.label for p, e in zip(preds, dev))
    assert 100 * hits / len(dev) == pytest.approx(res.metrics["accuracy"])
    card = (res.out_dir / "README.md").read_text()
    assert "classification" in card and "FLOPs" in card
    assert lmkit.load(res.out_dir).config.lora is None  # merged into a plain checkpoint


def test_classification_reports_its_dev_loss_and_final_scores_are_reused(tmp_path, data,
                                                                            encoder):
    """Classification scores its dev loss from the same forward passes as its accuracy (no
    second pass over the dev set), and the final scores are those of the evaluation that
    scored the final model: the kept best one here, equal to scoring the saved model anew."""
    from lmkit.data.batches import collate
    from lmkit.tasks import TASKS
    from lmkit.train.loop import evaluate

    res = run(tmp_path, encoder, task="classification", train=str(data / "cls_train.tsv"),
              dev=str(data / "cls_dev.tsv"), steps=12, eval_every=4, lr=2e-3, batch_size=16,
              best_metric="loss")
    evals = [r for r in res.curve if "accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert res.best is not None and res.metrics["loss"] == min(r["loss"] for r in evals)
    best = next(r for r in evals if r["step"] == res.best["step"])
    assert res.metrics == {k: best[k] for k in ("loss", "accuracy", "macro_f1")}
    assert evaluate_run(res.out_dir, data / "cls_dev.tsv") == pytest.approx(res.metrics)
    model = lmkit.load(res.out_dir)  # the loss equals the loss pass over padded batches
    task = TASKS["classification"](model.tokenizer, model.config)
    dev = task.read(data / "cls_dev.tsv", label_names=model.config.label_names)
    feats = [task.features(e) for e in dev]
    batches = [collate(feats[i:i + 16], model.config.fill_id()) for i in range(0, 60, 16)]
    assert evaluate(model, batches, "fp32")["loss"] == pytest.approx(res.metrics["loss"],
                                                                     abs=1e-5)


def test_ner(tmp_path, data, encoder):
    res = run(tmp_path, encoder, task="ner", train=str(data / "ner_train.txt"),
              dev=str(data / "ner_dev.txt"), epochs=2, lr=2e-3, batch_size=16)
    assert res.metrics["f1"] > 85, res.metrics
    text = "today  alice went to paris"
    spans = lmkit.pipeline("ner", res.out_dir)(text)
    assert [(s["type"], text[s["start"]:s["end"]]) for s in spans] == [("PER", "alice"),
                                                                        ("LOC", "paris")]
    assert all(0 < s["score"] <= 1 for s in spans)


def test_translation_encoder_decoder(tmp_path, data, seq2seq):
    res = run(tmp_path, seq2seq, task="translation", train=str(data / "mt_train.tsv"),
              dev=str(data / "mt_dev.tsv"), epochs=12, lr=3e-3, batch_size=16, num_beams=2)
    assert res.metrics["bleu"] > 50 and res.metrics["chrf"] > 60, res.metrics
    translate = lmkit.pipeline("translation", res.out_dir)
    assert isinstance(translate("alice went to paris"), str)
    dev = read_seq2seq(data / "mt_dev.tsv")  # the pipeline reproduces the reported score
    hyps = translate([e.source for e in dev])
    assert bleu(hyps, [e.target for e in dev])["bleu"] == pytest.approx(res.metrics["bleu"])


def test_generation_decoder(tmp_path, data, decoder):
    res = run(tmp_path, decoder, task="generation", train=str(data / "gen.jsonl"),
              dev=str(data / "gen.jsonl"), dev_limit=6, epochs=16, lr=3e-3, batch_size=8,
              max_new_tokens=4)
    assert res.metrics["perplexity"] < 1.5, res.metrics
    gen = lmkit.pipeline("generation", res.out_dir, max_new_tokens=4)
    assert gen("carol lives in").strip() == "oslo"


def test_frozen_body_keeps_pretrained_weights(tmp_path, data, encoder):
    res = run(tmp_path, encoder, task="classification", train=str(data / "cls_train.tsv"),
              steps=5, scheme="frozen", batch_size=8)
    before, after = lmkit.load(encoder), lmkit.load(res.out_dir)
    assert torch.equal(before.encoder.layers[0].attn.q.weight,
                       after.encoder.layers[0].attn.q.weight)
    assert res.trainable == 64 * 2 + 2


def test_bad_input_names_file_and_line(tmp_path, data, encoder, decoder):
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\nfine day\tpos\nodd one\tneutral\n")
    with pytest.raises(DataError, match=r"dev.tsv:3.*'neutral'"):
        run(tmp_path, encoder, task="classification", train=str(data / "cls_train.tsv"),
            dev=str(dev), steps=1)
    broken = tmp_path / "broken.txt"
    broken.write_text("alice B-PER\nparis\n")
    with pytest.raises(DataError, match=r"broken.txt:2"):
        run(tmp_path, encoder, task="ner", train=str(broken), steps=1)
    with pytest.raises(ValueError, match="translation task needs a encoder-decoder or decoder"):
        run(tmp_path, encoder, task="translation", train=str(data / "mt_train.tsv"), steps=1)
    with pytest.raises(ValueError, match="unknown task 'sentiment'"):
        run(tmp_path, encoder, task="sentiment", train=str(data / "cls_train.tsv"), steps=1)


def last_word_rows(path, n, seed):
    """Sentiment given by the last word only: the first tokens say nothing about the label."""
    rng = random.Random(seed)
    rows = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        rows.append(f"{sentence(rng, 5)} {rng.choice(GOOD if label == 'pos' else BAD)}\t{label}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("pooling", [None, "first"])
def test_decoder_classification_pools_the_last_token(tmp_path, decoder, pooling):
    """A decoder's first token has seen only itself: by default a decoder classifier pools
    its last real token, and learns a label that only the last word gives away."""
    train, dev = last_word_rows(tmp_path / "t.tsv", 300, 1), last_word_rows(tmp_path / "d.tsv",
                                                                            60, 2)
    res = run(tmp_path, decoder, task="classification", train=train, dev=dev, epochs=2,
              lr=3e-3, batch_size=16, pooling=pooling)
    assert lmkit.load(res.out_dir).config.pooling == (pooling or "last")
    if pooling is None:
        assert res.metrics["accuracy"] > 90, res.metrics
    else:  # the bug this guards against: token 0 cannot know the label
        assert res.metrics["accuracy"] < 75, res.metrics


def test_unknown_pooling_is_an_error(tmp_path, data, encoder):
    from lmkit.model.heads import pool
    from lmkit.train.options import read_config

    with pytest.raises(ValueError, match="pooling='max' is not supported"):
        read_config(FinetuneConfig, None, {"pooling": "max", "train": "x"})  # --set pooling=max
    with pytest.raises(ValueError, match="pooling is a classification option"):
        run(tmp_path, encoder, task="ner", train=str(data / "ner_train.txt"), steps=1,
            pooling="mean")
    with pytest.raises(ValueError, match="pooling='max' is not supported"):
        pool(torch.zeros(1, 3, 4), "max", None, torch.zeros(1, 3, dtype=torch.long), None)
    # Padded with the EOS id (a decoder without a pad token): pool the real EOS, not padding.
    hidden = torch.arange(4.0)[None, :, None]  # each position's vector is its index
    ids, segments = torch.tensor([[7, 2, 2, 2]]), torch.tensor([[1, 1, 0, 0]])
    assert pool(hidden, "eos", segments, ids, 2).item() == 1
    assert pool(hidden, "last", segments, ids, 2).item() == 1


def test_task_options_are_typed_and_checked(tmp_path, data, encoder):
    with pytest.raises(ValueError, match="num_beams: not an option of the classification task"):
        run(tmp_path, encoder, task="classification", train=str(data / "cls_train.tsv"),
            steps=1, num_beams=2)
    res = run(tmp_path, encoder, task="classification", train=str(data / "cls_train.tsv"),
              steps=1, text_column="sentence")
    assert json.loads((res.out_dir / "task.json").read_text())["options"] == {
        "text_column": "sentence"}  # only what was set: the defaults live in the task
    with pytest.raises(ValueError, match="top_k: not an option of the classification task"):
        pipeline("classification", res.out_dir, top_k=3)


def test_loaded_models_are_in_eval_mode_and_prediction_restores_the_mode(tmp_path, encoder):
    from lmkit.model import eval_mode

    model = lmkit.load(encoder)
    assert not model.training  # like from_pretrained: no dropout until training starts
    model.train()
    with eval_mode(model):
        assert not model.training
    assert model.training
    fill = lmkit.pipeline("fill-mask", encoder)
    fill.model.train()
    assert len(fill("the [MASK] was good")) == 5
    assert fill.model.training  # predict left the caller's mode as it was


def test_finetune_resumes_exactly_after_ctrl_c(tmp_path, data, encoder):
    """Stop a fine-tuning process with SIGINT, continue it with `lmkit finetune --resume`:
    the final weights are those of a run that was never stopped, bit for bit."""
    args = ["--task", "classification", "--train", data / "cls_train.tsv", "--steps", "16",
            "--lr", "2e-3", "--batch-size", "8", "--precision", "fp32", "--set", "progress=false",
            "--set",
            "tensorboard=false", "--set", "plot=false", "--set", "save_every=2", "--set",
            "log_every=1"]

    def cli(*more, ok=True):
        proc = subprocess.run([sys.executable, "-m", "lmkit.cli", "finetune", *map(str, more)],
                              capture_output=True, text=True, timeout=300)
        assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
        return proc

    script = tmp_path / "stop.py"  # the CLI, with a hook that says when step 3 is done
    script.write_text(textwrap.dedent("""
        import sys, time
        import lmkit.finetune.run as run
        train = run.train
        def slow_train(*args, on_step=None, **kwargs):
            def hook(step, record):
                if on_step is not None:
                    on_step(step, record)
                if step == 3:
                    print("READY", flush=True)
                if step >= 3:
                    time.sleep(0.2)  # the signal arrives long before the last step
            return train(*args, on_step=hook, **kwargs)
        run.train = slow_train
        from lmkit.cli import main
        sys.exit(main(sys.argv[1:]))
    """))
    proc = subprocess.Popen([sys.executable, str(script), "finetune", str(encoder),
                             *map(str, args), "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and f"lmkit finetune --resume {tmp_path / 'run'}" in err
    stopped = int(latest_checkpoint(tmp_path / "run").name.split("-")[1])
    assert 3 < stopped < 16

    again = cli(encoder, *args, "--out", tmp_path / "run", ok=False)  # a run is there
    assert "lmkit finetune --resume" in again.stderr and "--overwrite" in again.stderr
    # The run never stopped: a new run over a copy of the stopped one (--overwrite replaces it)
    shutil.copytree(tmp_path / "run", tmp_path / "straight")
    cli(encoder, *args, "--out", tmp_path / "straight", "--overwrite")
    straight = json.loads((tmp_path / "straight" / "compute.json").read_text())
    assert straight["sessions"] == 1 and [r["step"] for r in read_metrics(
        tmp_path / "straight") if r["split"] == "train"] == list(range(1, 17))
    cli("--resume", tmp_path / "run")
    a, b = lmkit.load(tmp_path / "straight"), lmkit.load(tmp_path / "run")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    compute = json.loads((tmp_path / "run" / "compute.json").read_text())
    assert compute["tokens"] == straight["tokens"] and compute["sessions"] == 2
    assert [(s["start_step"], s["end_step"]) for s in compute["segments"]] == [
        (0, stopped), (stopped, 16)]
    assert all(s["precision"] == "fp32" and s["device"] for s in compute["segments"])


def test_flops_follow_what_trains():
    """Full training costs 6N per token, a frozen body about 2N, LoRA about 4N."""
    with torch.device("meta"):
        model = lmkit.Model(lmkit.preset("bert-base", head="classification",
                                         label_names=["a", "b"]))
    kaplan = flops_per_token(model.config, 128)  # 6 x non-embedding parameters + attention
    flops = {}
    for scheme in ("full", "frozen", "lora"):
        for p in model.parameters():
            p.requires_grad_(True)
        if scheme == "lora":
            apply_scheme(model, "lora", lora=LoRAConfig(rank=8))
        else:
            apply_scheme(model, scheme)
        flops[scheme] = model.flops_per_token(128)
    assert flops["full"] == kaplan
    assert flops["full"] / flops["frozen"] == pytest.approx(3, rel=0.02)
    assert flops["full"] / flops["lora"] == pytest.approx(1.5, rel=0.02)
