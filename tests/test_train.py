"""The training loop: objectives overfit, exact resume, NaN stop, Ctrl-C, run records."""

import itertools
import json
import math
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import lmkit
from lmkit.data import PackedDataset, tokenize_corpus
from lmkit.flops import flops_per_token
from lmkit.objectives import CausalLM, MaskedLM, SpanCorruption
from lmkit.tokenizer import Tokenizer
from lmkit.train import (
    BatchStream,
    TrainConfig,
    TrainingDiverged,
    build_optimizer,
    latest_checkpoint,
    list_checkpoints,
    read_metrics,
    train,
)
from lmkit.train.optim import clip_gradients, lr_factor, sparse_embeddings

QUIET = dict(progress=False, tensorboard=False, plot=False)


def cfg(**kw) -> TrainConfig:
    base = dict(steps=10, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=0, save_every=0,
                **QUIET)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small tokenized corpus: (tokenizer, token cache)."""
    root = tmp_path_factory.mktemp("corpus")
    words = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "far", "away",
             "from", "big", "red", "house", "tree"]
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(words[i] for i in torch.randint(len(words), (int(n),), generator=g))
            for n in torch.randint(8, 40, (80,), generator=g)]
    (root / "c.txt").write_text("\n\n".join(docs) + "\n")
    tok = Tokenizer.train([root / "c.txt"], kind="bpe", vocab_size=300, family="encoder")
    return tok, tokenize_corpus([root / "c.txt"], tok, root / "cache")


def stream(corpus, objective, batch_size=4, seq_len=32):
    return BatchStream(PackedDataset(corpus[1], seq_len, seed=0), batch_size, objective)


# ---- each family learns under its objective ---------------------------------------------------

FAMILIES = {
    "decoder": ("tiny-decoder", lambda: CausalLM()),
    "encoder": ("tiny-encoder", lambda: MaskedLM(mask_id=4, vocab_size=512,
                                                 special_ids=range(5), mask_prob=0.3)),
    "encoder-decoder": ("tiny-seq2seq", lambda: SpanCorruption(
        sentinel_ids=range(500, 512), eos_id=1, pad_id=0, decoder_start_id=0)),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_overfits_a_small_batch(family, tmp_path):
    name, make_objective = FAMILIES[family]
    model = lmkit.Model(lmkit.preset(name))
    rows = {"input_ids": torch.randint(5, 120, (4, 32))}
    objective = make_objective()
    batches = (objective(rows) for _ in itertools.count())  # new masks / spans every step
    result = train(model, batches, cfg(steps=150, lr=1e-2, warmup_steps=5), tmp_path)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-5:]) / 5
    assert first > 4.0
    assert last < 0.45 * first, (first, last)
    assert result.stopped == "completed" and result.step == 150
    assert (tmp_path / "model.safetensors").exists()


# ---- exact resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_resume_continues_bit_for_bit(family, corpus, tmp_path):
    """10 steps straight == 6 steps, stop, resume with fresh objects, 4 more steps. Dropout,
    the objective's masks, data order, AdamW and the schedule must all continue exactly."""
    tok = corpus[0]

    def setup(seed):
        torch.manual_seed(seed)  # the resumed model starts from other weights: they get loaded
        if family == "decoder":
            config = lmkit.preset("tiny-decoder", vocab_size=tok.vocab_size, dropout=0.1)
            objective = CausalLM()
        else:
            config = lmkit.preset("tiny-encoder", vocab_size=tok.vocab_size, dropout=0.1)
            objective = MaskedLM.from_tokenizer(tok, seed=seed)
        return lmkit.Model(config), stream(corpus, objective, batch_size=2)

    c = cfg(steps=10, grad_accum=2, save_every=4, log_every=1)
    model_a, data = setup(0)
    straight = train(model_a, data, c, tmp_path / "a")

    model, data = setup(0)
    part = train(model, data, c, tmp_path / "b", max_steps=6)
    assert part.stopped == "max_steps" and part.step == 6
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-4", "step-6"]
    model2, data2 = setup(123)
    rest = train(model2, data2, c, tmp_path / "b", resume=True)

    assert rest.start_step == 6 and len(rest.losses) == 4
    assert part.losses + rest.losses == straight.losses  # exact float equality
    for (k, a), b in zip(model_a.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    steps = [r["step"] for r in read_metrics(tmp_path / "b") if r["split"] == "train"]
    assert steps == list(range(1, 11))  # nothing duplicated by the resume
    compute = json.loads((tmp_path / "b" / "compute.json").read_text())
    assert compute["sessions"] == 2 and compute["steps"] == 10
    assert compute["tokens"] == json.loads((tmp_path / "a" / "compute.json").read_text())["tokens"]


def test_grad_accumulation_matches_one_big_batch(corpus, tmp_path):
    """Losses are normalised by the target tokens of the whole step, so 2 x 2 rows == 4 rows."""
    tok = corpus[0]
    results = []
    for batch_size, accum in [(4, 1), (2, 2)]:
        torch.manual_seed(0)
        model = lmkit.Model(lmkit.preset("tiny-decoder", vocab_size=tok.vocab_size))
        res = train(model, stream(corpus, CausalLM(), batch_size), cfg(
            steps=3, batch_size=batch_size, grad_accum=accum), tmp_path / f"{accum}")
        results.append((res.losses, model.state_dict()))
    (l1, w1), (l2, w2) = results
    assert l1 == pytest.approx(l2, rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-6)


# ---- failures ------------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = lmkit.Model(lmkit.preset("tiny-decoder"))
    calls = itertools.count(1)
    # The 5th forward pass (step 5) produces NaN.
    model.tokens.register_forward_hook(
        lambda m, i, out: out * math.nan if next(calls) == 5 else out)
    rows = CausalLM()({"input_ids": torch.randint(5, 100, (2, 16))})
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5") as err:
        train(model, itertools.repeat(rows), cfg(steps=10, save_every=2), tmp_path)
    assert "step-4" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-4"]
    good = lmkit.load(latest_checkpoint(tmp_path))
    assert all(torch.isfinite(p).all() for p in good.parameters())
    state = torch.load(latest_checkpoint(tmp_path) / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4
    assert not (tmp_path / "model.safetensors").exists()  # no final model from a diverged run


def test_sigint_saves_a_checkpoint_then_stops(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import itertools, torch, lmkit
        from lmkit.objectives import CausalLM
        from lmkit.train import TrainConfig, train
        model = lmkit.Model(lmkit.preset("tiny-decoder"))
        rows = CausalLM()({{"input_ids": torch.randint(5, 100, (2, 16))}})
        def on_step(step, record):
            if step == 3:
                print("READY", flush=True)
        train(model, itertools.repeat(rows), TrainConfig(
            steps=1_000_000, save_every=0, eval_every=0, progress=False, tensorboard=False,
            plot=False), {str(tmp_path / "run")!r}, on_step=on_step)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "SIGINT received" in err and "checkpoint saved" in err
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and int(ckpt.name.split("-")[1]) >= 3
    assert lmkit.load(ckpt).config.family == "decoder"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == int(ckpt.name.split("-")[1])


def test_refuses_to_overwrite_a_run(tmp_path):
    model = lmkit.Model(lmkit.preset("tiny-decoder"))
    rows = CausalLM()({"input_ids": torch.randint(5, 100, (2, 16))})
    train(model, itertools.repeat(rows), cfg(steps=2), tmp_path)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(model, itertools.repeat(rows), cfg(steps=2), tmp_path)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        train(model, itertools.repeat(rows), cfg(batch_size=0), tmp_path / "x")
    with pytest.raises(ValueError, match="has no labels"):
        train(model, itertools.repeat({"input_ids": rows["input_ids"]}), cfg(), tmp_path / "y")


# ---- records -------------------------------------------------------------------------------------


def test_run_records_checkpoints_metrics_curve_and_compute(corpus, tmp_path):
    tok = corpus[0]
    model = lmkit.Model(lmkit.preset("tiny-decoder", vocab_size=tok.vocab_size))
    valid = [CausalLM()({"input_ids": torch.randint(5, 200, (2, 32))}) for _ in range(2)]
    c = TrainConfig(steps=6, batch_size=2, save_every=1, keep_checkpoints=2, eval_every=3,
                    log_every=2, progress=True, tensorboard=True, plot=True)
    result = train(model, stream(corpus, CausalLM(), 2), c, tmp_path, eval_batches=valid)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-5", "step-6"]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in records if r["split"] == "valid"] == [0, 3, 6]
    assert [e["step"] for e in result.evals] == [0, 3, 6]
    ev = result.evals[-1]
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert any((tmp_path / "tensorboard").iterdir())
    compute = json.loads((tmp_path / "compute.json").read_text())
    assert compute["tokens"] == 6 * 2 * 32
    assert compute["flops"] == pytest.approx(compute["tokens"] * flops_per_token(model.config, 32))
    assert isinstance(compute["wall_time_s"], float) and compute["device"]
    assert lmkit.load(tmp_path).tokenizer is None  # the final model (no tokenizer attached)


def test_bf16_autocast_trains(tmp_path):
    model = lmkit.Model(lmkit.preset("tiny-decoder"))
    rows = CausalLM()({"input_ids": torch.randint(5, 100, (4, 32))})
    result = train(model, itertools.repeat(rows), cfg(steps=30, precision="bf16"), tmp_path)
    assert all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32


# ---- optimizer and schedule ----------------------------------------------------------------------


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = lmkit.Model(lmkit.preset("tiny-encoder"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, keep = opt.param_groups
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "tokens.weight" in kept and "encoder.positions.weight" in kept
    assert all(n.endswith("bias") or "norm" in n or n in ("tokens.weight",
               "encoder.positions.weight", "encoder.types.weight") for n in kept)
    assert "encoder.layers.0.mlp.up.weight" in decayed or any(".mlp." in n for n in decayed)
    assert not any("norm" in n or n.endswith("bias") for n in decayed)
    assert len(kept) + len(decayed) == len(list(model.parameters()))


def _classifier(seed: int = 0) -> lmkit.Model:
    torch.manual_seed(seed)
    return lmkit.Model(lmkit.preset("tiny-encoder", head="classification",
                                    label_names=["a", "b"], pooling="first"))


def _cls_batches(rows: int, ids: torch.Tensor) -> list[dict]:
    """Batches that use exactly the token ids `ids` (each row a slice of them)."""
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": ids[torch.randperm(len(ids), generator=g)].view(rows, -1),
             "labels": torch.randint(2, (rows,), generator=g)} for _ in range(4)]


def test_sparse_embeddings_are_adamw_when_every_row_is_used(tmp_path):
    """Every step uses every embedding row: the lazy row update is AdamW to 1e-6 (with
    clipping, weight decay and the schedule, through the loop)."""
    batches = _cls_batches(8, torch.arange(512))
    runs = {}
    for sparse in (False, True):
        model = _classifier()
        c = cfg(steps=4, lr=1e-2, grad_clip=0.5, sparse_embeddings=sparse)
        runs[sparse] = (train(model, batches, c, tmp_path / str(sparse)), model)
    (dense, a), (lazy, b) = runs[False], runs[True]
    assert lazy.losses == pytest.approx(dense.losses, abs=1e-6)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if name.endswith("attn.k.bias"):  # its true gradient is 0 (softmax ignores it):
            continue  # Adam scales rounding noise to ~lr, differently per summation order
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=name)
    assert not b.tokens.sparse  # dense again after the run


def test_sparse_embeddings_leave_unused_rows_alone():
    model = _classifier()
    before = model.tokens.weight.detach().clone()
    sparse_embeddings(model)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    used = torch.arange(5, 69)
    for batch in _cls_batches(4, used):
        model(**batch).loss.backward()
        assert model.tokens.weight.grad.is_sparse
        clip_gradients(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    moved = (model.tokens.weight != before).any(-1)
    assert moved[used].all() and moved.sum() == len(used)
    assert opt.state[model.tokens.weight]["step"] == 4  # AdamW's state layout
    with pytest.raises(ValueError, match="not tied"):
        sparse_embeddings(lmkit.Model(lmkit.preset("tiny-decoder")))


def test_stop_at_ends_the_run_when_the_dev_metric_reaches_it(tmp_path):
    model = lmkit.Model(lmkit.preset("tiny-decoder"))
    rows = CausalLM()({"input_ids": torch.randint(5, 100, (2, 16))})
    scores = iter([50.0, 60.0, 90.0, 95.0])  # step 0, 1, 2, 3
    c = cfg(steps=10, eval_every=1, best_metric="accuracy", stop_at=88.0)
    result = train(model, itertools.repeat(rows), c, tmp_path,
                   scorer=lambda: {"accuracy": next(scores)})
    assert result.stopped == "early_stopped" and result.step == 2
    assert [e["accuracy"] for e in result.evals] == [50.0, 60.0, 90.0]
    with pytest.raises(lmkit.errors.ConfigError, match="best_metric"):
        cfg(stop_at=88.0).check_keep_best(True)


def test_warmup_then_cosine_or_linear_decay():
    f = lr_factor("cosine", warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(k) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)
    g = lr_factor("linear", 0, 10, 0.0)
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == 0.0
    assert lr_factor("constant", 2, 10)(7) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor("exp", 0, 10)
