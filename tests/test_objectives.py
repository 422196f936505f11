import re

import pytest
import torch

from lmkit.objectives import (
    IGNORE_INDEX,
    CausalLM,
    MaskedLM,
    SpanCorruption,
    TextInfilling,
    infill,
    replace_runs,
)
from lmkit.tokenizer import Tokenizer

PAD, EOS, MASK, SPECIAL = 0, 1, 2, [0, 1, 2, 3]
SENTINELS = list(range(100, 200))


def random_batch(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Ids 10..99 (never special)."""
    return torch.randint(10, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_causal_lm_labels_by_hand():
    batch = {"input_ids": torch.tensor([[11, 12, 13, 21, 22, 31, 32, 0]]),
             "segment_ids": torch.tensor([[1, 1, 1, 2, 2, 3, 3, 0]])}
    out = CausalLM()(batch)
    x = IGNORE_INDEX
    assert out["labels"].tolist() == [[11, 12, 13, x, 22, x, 32, x]]
    assert out["input_ids"] is batch["input_ids"] and out["segment_ids"] is batch["segment_ids"]
    padded = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 9]]),
              "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    assert CausalLM()(padded)["labels"].tolist() == [[5, 6, 7], [8, 9, x]]
    assert CausalLM()({"input_ids": torch.tensor([[4, 5]])})["labels"].tolist() == [[4, 5]]


def test_masked_lm_statistics():
    ids = random_batch(64, 256)
    ids[:, 0], ids[:, -1] = 3, EOS  # special tokens, e.g. [CLS] ... [SEP]
    mask = torch.ones_like(ids)
    mask[:8, 200:] = 0  # padding
    batch = {"input_ids": ids, "attention_mask": mask}
    out = MaskedLM(MASK, 100, SPECIAL, seed=0)(batch)
    picked = out["labels"] != IGNORE_INDEX
    assert torch.equal(out["labels"][picked], ids[picked])
    assert not picked[:, 0].any() and not picked[:, -1].any() and not picked[mask == 0].any()
    candidates = (mask == 1).sum() - 2 * 64
    assert abs(picked.sum() / candidates - 0.15) < 0.01
    new = out["input_ids"]
    masked = (new == MASK) & picked
    changed = (new != ids) & ~masked
    kept = (new == ids) & picked
    assert abs(masked.sum() / picked.sum() - 0.8) < 0.02
    # A random replacement may draw the original id (1 in 96 here), so count it with "kept".
    assert abs(changed.sum() / picked.sum() - 0.1 * 95 / 96) < 0.02
    assert abs(kept.sum() / picked.sum() - 0.1 * 97 / 96) < 0.02
    assert torch.equal(new[~picked], ids[~picked])
    assert not torch.isin(new[changed], torch.tensor(SPECIAL)).any()
    assert out["attention_mask"] is mask


def test_masked_lm_is_deterministic_and_resumable():
    batch = {"input_ids": random_batch(4, 32)}
    a, b = MaskedLM(MASK, 100, SPECIAL, seed=5), MaskedLM(MASK, 100, SPECIAL, seed=5)
    first = a(batch)
    assert torch.equal(first["input_ids"], b(batch)["input_ids"])
    state = a.state_dict()
    second = a(batch)
    assert not torch.equal(second["labels"], first["labels"])
    b.load_state_dict(state)
    assert torch.equal(b(batch)["labels"], second["labels"])


def test_whole_word_masking():
    # Word starts: ids divisible by 4. Words therefore run 20 21 22 23 | 24 25 | ...
    starts = [i % 4 == 0 for i in range(100)]
    ids = torch.arange(20, 100).repeat(40, 1)
    batch = {"input_ids": ids}
    out = MaskedLM(MASK, 100, SPECIAL, starts, whole_word=True, mask_prob=0.2, seed=1)(batch)
    picked = (out["labels"] != IGNORE_INDEX).view(40, 20, 4)
    assert (picked.all(-1) | ~picked.any(-1)).all()  # every word all in or all out
    assert abs(picked.all(-1).float().mean() - 0.2) < 0.03
    with pytest.raises(ValueError, match="whole_word=True needs word_starts"):
        MaskedLM(MASK, 100, SPECIAL, whole_word=True)


def test_whole_word_masking_with_a_wordpiece_tokenizer(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(["unbelievable tokenization runs", "tokenization is fun"] * 30))
    tok = Tokenizer.train([text], "wordpiece", 40, family="encoder")
    ids = tok.encode("unbelievable tokenization")
    assert len(ids) > 4  # both words are split into "##" pieces
    mlm = MaskedLM.from_tokenizer(tok, whole_word=True, mask_prob=0.5, seed=0)
    words = tok.encode_with_offsets("unbelievable tokenization").word_ids
    for _ in range(10):
        picked = mlm({"input_ids": torch.tensor([ids])})["labels"][0] != IGNORE_INDEX
        for w in {0, 1}:
            assert len({bool(picked[i]) for i, wi in enumerate(words) if wi == w}) == 1
        assert not picked[0] and not picked[-1]  # [CLS], [SEP]
    gpt = Tokenizer.train([text], "bpe", 300)
    with pytest.raises(ValueError, match="no mask token"):
        MaskedLM.from_tokenizer(gpt)
    with pytest.raises(ValueError, match="TextInfilling needs mask_id but got None"):
        TextInfilling.from_tokenizer(gpt)
    with pytest.raises(ValueError, match="word_starts has 3 entries for a vocabulary of 100"):
        MaskedLM(MASK, 100, SPECIAL, [True] * 3)


def test_replace_runs():
    tokens = torch.arange(10, 20)
    runs = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    assert replace_runs(tokens, runs, torch.tensor([7, 8, 9])).tolist() == [
        10, 7, 13, 14, 8, 16, 17, 9]
    assert replace_runs(tokens, runs, -1).tolist() == [10, -1, 13, 14, -1, 16, 17, -1]


def unsentinel(inputs: list[int], targets: list[int]) -> list[int]:
    """Put the spans of ``targets`` back in place of the sentinels of ``inputs``."""
    spans, current = {}, None
    for t in targets:
        if t in SENTINELS:
            current = spans.setdefault(t, [])
        elif current is not None:
            current.append(t)
    return [x for t in inputs for x in (spans[t] if t in SENTINELS else [t])]


def test_span_corruption_reconstructs_the_original():
    ids = random_batch(16, 120)
    lengths = torch.randint(20, 121, (16,), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(120) < lengths[:, None]).long()
    sc = SpanCorruption(SENTINELS, EOS, PAD, decoder_start_id=PAD, seed=0)
    out = sc({"input_ids": ids, "attention_mask": mask})
    noise = 0
    for i in range(16):
        n = int(lengths[i])
        inputs = out["input_ids"][i][out["attention_mask"][i] == 1].tolist()
        targets = out["labels"][i][out["labels"][i] != IGNORE_INDEX].tolist()
        assert inputs[-1] == EOS and targets[-1] == EOS
        used = [t for t in inputs if t in SENTINELS]
        assert used == SENTINELS[:len(used)] and [t for t in targets if t in SENTINELS] == used
        assert unsentinel(inputs[:-1], targets[:-1]) == ids[i, :n].tolist()
        assert out["decoder_attention_mask"][i].sum() == len(targets)
        noise += len(targets) - 1 - len(used)
    assert abs(noise / lengths.sum() - 0.15) < 0.01
    labels = out["labels"].masked_fill(out["labels"] == IGNORE_INDEX, PAD)
    assert torch.equal(out["decoder_input_ids"][:, 0], torch.full((16,), PAD))
    assert torch.equal(out["decoder_input_ids"][:, 1:], labels[:, :-1])


def test_span_corruption_noise_mask_layout():
    sc = SpanCorruption(SENTINELS, EOS, PAD, decoder_start_id=PAD, noise_density=0.25,
                        mean_span_length=2.0, seed=3)
    mask = sc.noise_mask(40)
    assert int(mask.sum()) == 10 and not mask[0] and mask[-1]  # T5: starts kept, ends noise
    starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])
    assert int(starts.sum()) == 5  # round(10 / 2.0) spans
    assert sc.noise_mask(1).tolist() == [False]
    with pytest.raises(ValueError, match="needs sentinel ids"):
        SpanCorruption([], EOS, PAD, decoder_start_id=PAD)


def test_span_corruption_from_tokenizer(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(["the cat sat on the mat"] * 20))
    tok = Tokenizer.train([text], "unigram", 150, family="encoder-decoder")
    sc = SpanCorruption.from_tokenizer(tok, seed=0)
    ids = torch.tensor([tok.encode("the cat sat on the mat the cat sat", add_special_tokens=False)])
    out = sc({"input_ids": ids})
    assert tok.decode(out["input_ids"][0], skip_special_tokens=False).count("<extra_id_0>") == 1
    assert out["decoder_input_ids"][0, 0] == tok.pad_id


def test_infill_by_hand():
    tokens = torch.arange(10, 20)
    # Spans: [2, 4) masked, insert before 5, insert before 0, [9, 14) clipped to the end,
    # insert before 4 (right after a masked run: merged), [6, 7) and [7, 8) touching: merged.
    starts = torch.tensor([2, 5, 0, 9, 4, 6, 7])
    lengths = torch.tensor([2, 0, 0, 5, 0, 1, 1])
    assert infill(tokens, starts, lengths, -1).tolist() == [
        -1, 10, 11, -1, 14, -1, 15, -1, 18, -1]


def test_text_infilling_keeps_the_original_as_labels():
    ids = random_batch(16, 100, seed=2)
    ti = TextInfilling(mask_id=MASK, pad_id=PAD, decoder_start_id=EOS, seed=0)
    out = ti({"input_ids": ids})
    assert torch.equal(out["labels"], ids)
    assert torch.equal(out["decoder_input_ids"][:, 1:], ids[:, :-1])
    assert (out["decoder_input_ids"][:, 0] == EOS).all()
    removed = 0
    for i in range(16):
        inputs = out["input_ids"][i][out["attention_mask"][i] == 1].tolist()
        # The input is the original with some runs of >= 0 tokens turned into one mask each.
        pattern = "".join(r"(?:\d+ )*" if t == MASK else f"{t} " for t in inputs)
        assert re.fullmatch(pattern, "".join(f"{t} " for t in ids[i].tolist()))
        assert MASK in inputs
        removed += 100 - sum(t != MASK for t in inputs)
    assert 0.2 < removed / ids.numel() <= 0.3  # 30% asked; overlapping spans cover less


def test_text_infilling_is_deterministic_and_handles_padding():
    ids = random_batch(3, 40)
    mask = torch.tensor([[1] * 40, [1] * 25 + [0] * 15, [1] * 3 + [0] * 37])
    a = TextInfilling(MASK, PAD, EOS, seed=9)({"input_ids": ids, "attention_mask": mask})
    b = TextInfilling(MASK, PAD, EOS, seed=9)({"input_ids": ids, "attention_mask": mask})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (a["labels"][1, 25:] == IGNORE_INDEX).all()
    assert (a["labels"][2, 3:] == IGNORE_INDEX).all()
    assert a["decoder_attention_mask"].sum(1).tolist() == [40, 25, 3]
    assert TextInfilling(MASK, PAD, EOS, mask_prob=0.0)({"input_ids": ids})[
        "input_ids"].tolist() == ids.tolist()
