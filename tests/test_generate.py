"""KV cache equivalence, greedy / sampling / beam search."""

import contextlib
import itertools
import json

import pytest
import torch
from conftest import VARIANTS, family_of, tiny, variant

import lmkit
from lmkit.generate import _beam, _Decoder, _draw, _filter, _pad_prompts, _Processors, _sample
from lmkit.model import layers
from lmkit.objectives import CausalLM
from lmkit.train import TrainConfig, train

DECODING = [k for k in VARIANTS if family_of(k) != "encoder"]


@pytest.mark.parametrize("key", DECODING)
def test_kv_cache_matches_full_prefix(key):
    """Logits at every cached step equal a full forward over the prefix, with a padded batch."""
    model = variant(key)
    prompts = [[5, 9, 14, 3, 8], [7, 22]]
    steps = [[11, 12, 13, 14], [21, 22, 23, 24]]
    left = model.config.family == "decoder"
    ids, mask = _pad_prompts(prompts, 0, left=left)
    dec = _Decoder(model, ids, mask)
    logp = dec.logits(dec.prefix)
    prefix = dec.prefix
    for t in range(4):
        if model.config.family == "decoder":
            full_mask = torch.cat([mask, torch.ones(2, prefix.shape[1] - mask.shape[1],
                                                    dtype=torch.long)], 1)
            full = model(prefix, attention_mask=full_mask).logits[:, -1]
        else:
            full = model(ids, attention_mask=mask, decoder_input_ids=prefix).logits[:, -1]
        torch.testing.assert_close(logp.log_softmax(-1), full.log_softmax(-1), atol=1e-5, rtol=0)
        nxt = torch.tensor([[steps[0][t]], [steps[1][t]]])
        prefix = torch.cat([prefix, nxt], 1)
        logp = dec.logits(nxt)


@pytest.mark.parametrize("key", ["decoder-rotary-gqa", "seq2seq-relative-t5"])
def test_padded_batch_generates_like_single(key):
    model = variant(key)
    prompts = [[5, 9, 14, 3, 8, 4, 4], [7, 22]]
    batch = lmkit.generate(model, prompts, max_new_tokens=6)
    for i, p in enumerate(prompts):
        alone = lmkit.generate(model, [p], max_new_tokens=6)
        assert batch.sequences[i] == alone.sequences[0]
        assert batch.scores[i] == pytest.approx(alone.scores[0], abs=1e-4)


@pytest.mark.parametrize("key", ["decoder-rotary-gqa", "seq2seq-relative-t5",
                                 "decoder-learned-gpt2"])
def test_beam_of_width_one_is_greedy(key):
    model = variant(key)
    prompts = [[5, 9, 14], [7, 22, 3, 3]]
    greedy = lmkit.generate(model, prompts, max_new_tokens=8)
    beam = lmkit.generate(model, prompts, max_new_tokens=8, num_beams=1)
    assert greedy.sequences == beam.sequences
    # the beam code path itself with width 1 (no early EOS in an untrained model)
    ids, mask = _pad_prompts(prompts, 0, left=model.config.family == "decoder")
    seqs, _ = _beam(_Decoder(model, ids, mask), 8, eos=(), width=1, length_penalty=1.0,
                    early_stopping=True, n_best=1, process=_Processors())
    assert seqs == greedy.sequences


def test_beam_sorted_and_at_least_greedy():
    model = variant("seq2seq-relative-t5")
    out = lmkit.generate(model, [[5, 9, 14, 1]], max_new_tokens=6, num_beams=4,
                         num_return_sequences=4, length_penalty=0.0)
    assert len(out.sequences) == 4
    assert out.scores == sorted(out.scores, reverse=True)
    assert len({tuple(s) for s in out.sequences}) == 4
    greedy = lmkit.generate(model, [[5, 9, 14, 1]], max_new_tokens=6)
    assert out.scores[0] >= greedy.scores[0] - 1e-5  # length_penalty 0: plain log-prob sums


def test_beam_scores_are_sequence_logprobs():
    """A returned beam score equals the model's own log-probability of that sequence."""
    model = variant("decoder-rotary-gqa")
    prompt = [5, 9, 14]
    out = lmkit.generate(model, [prompt], max_new_tokens=5, num_beams=3, length_penalty=0.0,
                         eos_id=-1)
    seq = out.sequences[0]
    logits = model(torch.tensor([prompt + seq])).logits[0].log_softmax(-1)
    expected = sum(logits[len(prompt) - 1 + i, tok].item() for i, tok in enumerate(seq))
    assert out.scores[0] == pytest.approx(expected, abs=1e-4)


def test_stops_at_eos():
    model = tiny("tiny-decoder", tie_embeddings=False, lm_head_bias=True)
    with torch.no_grad():  # make EOS (id 2) the certain next token
        model.head.proj.weight.zero_()
        model.head.proj.bias[2] = 10.0
    assert lmkit.generate(model, [[5, 6], [7]], max_new_tokens=10).sequences == [[], []]
    assert lmkit.generate(model, [[5, 6]], max_new_tokens=4, eos_id=-1).sequences == [[2] * 4]
    beam = lmkit.generate(model, [[5, 6]], max_new_tokens=4, num_beams=2)
    assert beam.sequences[0] == []


def test_sampling_is_seeded_and_filters():
    model = tiny("tiny-decoder")
    a = lmkit.generate(model, [[5, 6]], max_new_tokens=8, do_sample=True, seed=3)
    b = lmkit.generate(model, [[5, 6]], max_new_tokens=8, do_sample=True, seed=3)
    assert a.sequences == b.sequences
    greedy = lmkit.generate(model, [[5, 6]], max_new_tokens=8)
    top1 = lmkit.generate(model, [[5, 6]], max_new_tokens=8, do_sample=True, top_k=1, seed=1)
    assert top1.sequences == greedy.sequences
    tiny_p = lmkit.generate(model, [[5, 6]], max_new_tokens=8, do_sample=True, top_p=1e-6,
                            seed=1)
    assert tiny_p.sequences == greedy.sequences
    cold = lmkit.generate(model, [[5, 6]], max_new_tokens=8, do_sample=True,
                          temperature=1e-4, seed=1)
    assert cold.sequences == greedy.sequences


def test_n_samples_per_prompt():
    """num_return_sequences with sampling: n consecutive rows per prompt, each an independent
    sample whose score is its log-probability as a continuation of its own prompt."""
    model = tiny("tiny-decoder")
    prompts = [[5, 6], [7, 8, 9]]
    out = lmkit.generate(model, prompts, max_new_tokens=6, do_sample=True, seed=0,
                         num_return_sequences=4, temperature=2.0)
    assert len(out.sequences) == len(out.scores) == 8
    assert len({tuple(s) for s in out.sequences[:4]}) > 1  # not one sample repeated
    for i, (seq, score) in enumerate(zip(out.sequences, out.scores)):
        ids = torch.tensor([prompts[i // 4] + seq])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        n = len(prompts[i // 4])
        target = ids[0, n:]
        expected = logp[n - 1:].gather(-1, target[:, None]).sum().item()
        if len(seq) < 6:  # stopped at EOS, whose probability is in the score too
            expected += torch.log_softmax(model(ids).logits[0, -1], -1)[2].item()
        assert score == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="do_sample=True for n samples"):
        lmkit.generate(model, prompts, num_return_sequences=2)


def test_filter_top_p_keeps_smallest_nucleus():
    logp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(_filter(logp, 1.0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]


def test_draw_keeps_top_k_then_top_p():
    """Sampling draws among the top-k tokens only, then within top-p of their probabilities."""
    logp = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]]).log().expand(2000, -1)
    gen = torch.Generator().manual_seed(0)
    assert set(_draw(logp, 1.0, 3, None, gen).tolist()) == {1, 3, 4}
    # the top 3 renormalised: 0.47, 0.35, 0.18; top-p 0.5 keeps the first two
    assert set(_draw(logp, 1.0, 3, 0.5, gen).tolist()) == {1, 3}
    assert set(_draw(logp, 1.0, None, None, gen).tolist()) == {0, 1, 2, 3, 4}


def test_generate_rejects_bad_input():
    model = tiny("tiny-encoder")
    with pytest.raises(ValueError, match="LM head"):
        lmkit.generate(model, [[1, 2]])
    with pytest.raises(ValueError, match="tokenizer"):
        lmkit.generate(tiny("tiny-decoder"), "hello")
    with pytest.raises(ValueError, match="at least one token"):
        lmkit.generate(tiny("tiny-decoder"), [[]])


class Uncached:
    """The reference decoder: every step runs the model over the whole sequence so far (no
    KV cache), behind `_Decoder`'s interface (prefix, reorder, logits)."""

    def __init__(self, model, ids, mask):
        self.model, self.ids, self.mask = model, ids, mask
        self.encdec = model.config.family == "encoder-decoder"
        self.prefix = ids.new_full((len(ids), 1), model.config.decoder_start_id) \
            if self.encdec else ids
        self.seq = None  # the decoder's tokens so far

    def reorder(self, index, within_prompts=False):
        self.prefix, self.ids = self.prefix.index_select(0, index), self.ids.index_select(0, index)
        self.mask = self.mask.index_select(0, index) if self.mask is not None else None
        if self.seq is not None:
            self.seq = self.seq.index_select(0, index)

    def logits(self, new_ids):
        self.seq = new_ids if self.seq is None else torch.cat([self.seq, new_ids], 1)
        if self.encdec:
            out = self.model(self.ids, attention_mask=self.mask, decoder_input_ids=self.seq)
        else:
            mask = None if self.mask is None else torch.cat(
                [self.mask, self.mask.new_ones(len(self.seq), self.seq.shape[1] -
                                               self.mask.shape[1])], 1)
            out = self.model(self.seq, attention_mask=mask)
        return out.logits[:, -1].float()


# Every decoding family: GPT-2 and Llama-like (GQA, MQA with partial rotary), a sliding window
# shorter than the generation, LoRA (q/k/v not fused; or on the MLP), per-head query/key norms
# with biases in the fused projections and scaled rotary tables, BART, T5 and
# 2017-Transformer-like.
STATIC_CACHE = {key: VARIANTS[key] for key in DECODING} | {
    "decoder-sliding-window": ("tiny-decoder", dict(sliding_window=3)),
    "decoder-lora": ("tiny-decoder", dict(lora={"rank": 2, "targets": ["q", "k", "v"]})),
    "decoder-lora-mlp": ("tiny-decoder", dict(lora={"rank": 2, "targets": ["gate", "up", "o"]})),
    "decoder-qk-norm-biases": ("tiny-decoder", dict(
        qk_norm=True, attention_bias=True, mlp_bias=True,
        rope_scaling={"type": "linear", "factor": 2.0})),
}


@pytest.mark.parametrize("mode", ["greedy", "sampling", "beam"])
@pytest.mark.parametrize("key", list(STATIC_CACHE))
def test_static_cache_decodes_like_the_uncached_forward(key, mode):
    """Static-cache decoding gives exactly the tokens (and scores) of recomputing the whole
    sequence each step: greedy, seeded sampling and beam search, on a padded batch and on
    one prompt, with the cache allocated for the whole generation or grown as it goes, and
    with fixed-shape steps (what `compile` compiles: the whole buffer under a mask)."""
    name, overrides = STATIC_CACHE[key]
    model = tiny(name, **overrides)
    left = model.config.family == "decoder"
    for name, p in model.named_parameters():  # LoRA's B starts at zero: make it count
        if name.endswith("lora_b"):
            torch.nn.init.normal_(p, std=0.2)
    for prompts in ([[5, 9, 14, 3, 8, 4, 4], [7, 22], [11, 6, 30]], [[5, 9, 14]]):
        ids, mask = _pad_prompts(prompts, 0, left=left)
        results = []
        for dec in (_Decoder(model, ids, mask, max_new=10), _Decoder(model, ids, mask),
                    Uncached(model, ids, mask),
                    _Decoder(model, ids, mask, max_new=10, fixed=True)):
            with torch.inference_mode():
                if mode == "beam":
                    out = _beam(dec, 10, eos=(), width=3, length_penalty=1.0,
                                early_stopping=True, n_best=2, process=_Processors())
                else:
                    gen = torch.Generator().manual_seed(7)
                    out = _sample(dec, 10, eos=(), pad=0, greedy=mode == "greedy",
                                  temperature=1.5, top_k=None, top_p=0.95, gen=gen,
                                  process=_Processors(), stream=None)
            results.append(out)
        (cached, scores), (grown, grown_scores), (full, full_scores), (fixed, fixed_scores) \
            = results
        assert cached == grown == full == fixed
        assert all(len(s) == 10 for s in cached)
        for got in (scores, fixed_scores):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(full_scores),
                                       atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(grown_scores), torch.tensor(scores),
                                   atol=1e-6, rtol=0)


def _linear_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _qkv(model: lmkit.Model) -> tuple[torch.nn.Module, ...]:
    attn = model.decoder.layers[0].attn
    return attn.q, attn.k, attn.v


def test_generate_lays_weights_out_for_decoding_and_nothing_else_changes(tmp_path):
    """The first generate() stores every linear weight (the tied table too) as its row-major
    transpose: the same values, logits, fused projections and saved bytes."""
    model = variant("decoder-learned-gpt2")
    ids = torch.tensor([[5, 9, 14, 3]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(ids).logits
    qkv = layers.fuse(_qkv(model))
    model.save(tmp_path / "row-major")
    first = lmkit.generate(model, [[5, 9, 14, 3]], max_new_tokens=6)
    weights = _linear_weights(model)
    assert weights and all(w.t().is_contiguous() and not w.is_contiguous() for w in weights)
    assert not model.tokens.weight.is_contiguous()  # tied to the head: laid out with it
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=0)
    x = torch.randn(3, model.config.hidden_size)
    torch.testing.assert_close(layers.fuse(_qkv(model))(x),
                               qkv(x), atol=1e-5, rtol=0)
    assert lmkit.generate(model, [[5, 9, 14, 3]], max_new_tokens=6).sequences == \
        first.sequences
    model.save(tmp_path / "laid-out")
    assert _safetensors(tmp_path / "laid-out") == _safetensors(tmp_path / "row-major")


def _safetensors(folder) -> tuple[dict, bytes]:
    """A weights file's header (parsed: its metadata's key order varies) and its bytes."""
    raw = (folder / "model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def test_training_lays_the_weights_back_out(tmp_path):
    """Training after generate() runs on row-major weights and gives the same model."""
    rows = CausalLM()({"input_ids": torch.randint(5, 100, (2, 16),
                                                  generator=torch.Generator().manual_seed(0))})
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=0, eval_every=0,
                      save_every=0, progress=False, tensorboard=False, plot=False)
    models = []
    for decoded in (False, True):
        torch.manual_seed(0)
        model = lmkit.Model(lmkit.preset("tiny-decoder"))
        if decoded:
            lmkit.generate(model, [[5, 6]], max_new_tokens=2)
        train(model, itertools.repeat(rows), cfg, tmp_path / str(decoded))
        assert all(w.is_contiguous() for w in _linear_weights(model))
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_beam_search_with_fewer_tokens_than_twice_the_beams():
    """Each beam's 2W best continuations are taken first; a vocabulary smaller than 2W gives
    all of them, and the beam scores stay the model's own log-probabilities."""
    model = tiny("tiny-decoder", vocab_size=6)
    out = lmkit.generate(model, [[1, 4]], max_new_tokens=3, num_beams=4, length_penalty=0.0,
                         eos_id=-1, num_return_sequences=4)
    assert len(out.sequences) == 4 and out.scores == sorted(out.scores, reverse=True)
    for seq, score in zip(out.sequences, out.scores, strict=True):
        logp = model(torch.tensor([[1, 4] + seq])).logits[0].log_softmax(-1)
        assert score == pytest.approx(sum(logp[1 + i, t].item() for i, t in enumerate(seq)),
                                      abs=1e-4)


@pytest.mark.skipif(not layers._MKL_LINEAR, reason="this torch build has no MKL linear ops")
def test_packed_linears_multiply_as_f_linear_and_follow_the_weights():
    """Inside `packed_linears(rows)`, a linear layer over exactly `rows` rows multiplies by a
    packed copy of its weight: the same output, the copy reused, rebuilt after the weight
    changes; other row counts, tensors that are not Parameters and autograd run as before."""
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(24, 40), torch.randn(4, 1, 24)
    cpu = x.device
    with torch.inference_mode():
        plain = lin(x)
        with layers.packed_linears(4, cpu):
            packed = lin(x)
            first = layers._PACKED[lin.weight][1]
            torch.testing.assert_close(lin(x), plain, atol=1e-5, rtol=0)
            assert layers._PACKED[lin.weight][1] is first  # reused, not packed again
            three = torch.randn(3, 24)
            assert torch.equal(lin(three), torch.nn.functional.linear(three, lin.weight,
                                                                      lin.bias))
            loose = torch.randn(40, 24)  # not a Parameter: a copy made per call, say
            torch.nn.functional.linear(x, loose)
        assert loose not in layers._PACKED
        torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place, as an optimizer step: the packed copy is stale
    with torch.inference_mode(), layers.packed_linears(4, cpu):
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias),
                                   atol=1e-5, rtol=0)
        assert layers._PACKED[lin.weight][1] is not first
    with layers.packed_linears(4, cpu):  # autograd on: the plain op, which has gradients
        lin(x).sum().backward()
    assert lin.weight.grad is not None
    assert isinstance(layers.packed_linears(1, cpu), contextlib.nullcontext)


@pytest.mark.skipif(not layers._MKL_LINEAR, reason="this torch build has no MKL linear ops")
def test_beam_search_packs_the_weights_and_training_drops_them():
    """Beam search (several rows a step) decodes on packed weights, with the tokens of the
    unpacked steps; laying the weights out for training frees the packed copies."""
    model = variant("decoder-learned-gpt2")
    prompts = [[5, 9, 14, 3], [7, 22]]
    settings = dict(max_new_tokens=6, num_beams=3, eos_id=-1, num_return_sequences=2)
    ids, mask = _pad_prompts(prompts, 0, left=True)
    with torch.inference_mode():
        plain = _beam(Uncached(model, ids, mask), 6, eos=(), width=3, length_penalty=1.0,
                      early_stopping=True, n_best=2, process=_Processors())
    out = lmkit.generate(model, prompts, **settings)
    assert out.sequences == plain[0]
    weights = _linear_weights(model)
    fused = {id(m.weight) for block in model.decoder.layers  # packed fused, as q|k|v
             for m in (block.attn.q, block.attn.k, block.attn.v)}
    assert all((w in layers._PACKED) != (id(w) in fused) for w in weights)  # head: tied
    layers.lay_out(model, decoding=False)
    assert not any(w in layers._PACKED for w in weights)


def test_fused_projections_are_kept_until_a_weight_changes():
    """`fuse` gives the same fused layer to the next generation, a new one once a weight it
    joins changes (in place, as an optimizer step does), none kept after training's lay-out."""
    model = variant("decoder-learned-gpt2")
    linears = _qkv(model)
    x = torch.randn(3, model.config.hidden_size)
    with torch.inference_mode():
        first = layers.fuse(linears)
        assert layers.fuse(linears) is first
    with torch.no_grad():
        linears[1].weight.mul_(2.0)
    with torch.inference_mode():
        second = layers.fuse(linears)
        assert second is not first
        torch.testing.assert_close(second(x), torch.cat([m(x) for m in linears], dim=-1),
                                   atol=1e-5, rtol=0)
    layers.lay_out(model, decoding=False)
    assert linears[0].weight not in layers._FUSED


@pytest.mark.parametrize("settings", [
    {}, dict(repetition_penalty=1.3), dict(no_repeat_ngram=2), dict(no_repeat_ngram=5),
    dict(forced_bos=3), dict(forced_eos=2)])
def test_processors_say_when_they_leave_the_scores_as_they_are(settings):
    """Beam search skips the full log-softmax when the processors are idle: `idle` only
    where they return the scores unchanged, always without any processor, and each processor
    here acts in one of the cases."""
    process = _Processors(**settings)
    scores = torch.randn(2, 12).log_softmax(-1)
    acted = False
    for history in (torch.tensor([[1], [4]]), torch.tensor([[1, 5, 1], [4, 4, 4]])):
        for last in (False, True):
            changed = not torch.equal(process(scores, history, last), scores)
            idle = process.idle(history, last)
            assert not (idle and changed), (history, last)
            assert idle or settings, (history, last)
            acted |= changed
    assert acted == bool(settings) or settings == dict(no_repeat_ngram=5)  # 3 tokens < 5
