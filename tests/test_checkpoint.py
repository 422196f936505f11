"""Checkpoint folders: bit-exact round trips, integrity checks, new heads."""

import json

import pytest
import torch
from conftest import VARIANTS, variant

import lmkit
from lmkit.checkpoint import CheckpointError


@pytest.mark.parametrize("key", list(VARIANTS))
def test_round_trip_is_bit_exact(tmp_path, key):
    model = variant(key)
    model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json",
                                                                     "model.safetensors"]
    loaded = lmkit.load(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b), n1
    ids = torch.randint(3, 500, (2, 7))
    kw = {"decoder_input_ids": ids} if model.config.family == "encoder-decoder" else {}
    assert torch.equal(model(ids, **kw).logits, loaded(ids, **kw).logits)
    if model.config.tie_embeddings and model.config.head == "lm":
        assert loaded.head.proj.weight is loaded.tokens.weight  # tying survives the trip


def test_bfloat16_round_trip(tmp_path):
    model = lmkit.Model(lmkit.preset("tiny-decoder", dtype="bfloat16")).to(torch.bfloat16)
    model.save(tmp_path / "m")
    loaded = lmkit.load(tmp_path / "m")
    assert loaded.tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.tokens.weight, model.tokens.weight)


def test_save_replaces_atomically_and_keeps_other_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    variant("decoder-rotary-gqa").save(out)
    second = variant("decoder-rotary-gqa")
    second.save(out)
    assert (out / "metrics.jsonl").read_text() == "{}\n"
    assert torch.equal(lmkit.load(out).tokens.weight, second.tokens.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = variant("decoder-rotary-gqa")
    model.save(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(lmkit.checkpoint, "save_file", broken)
    with pytest.raises(OSError):
        variant("decoder-rotary-gqa").save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_truncated_file_gives_clear_error(tmp_path):
    variant("decoder-rotary-gqa").save(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        lmkit.load(tmp_path / "m")


def test_garbage_header_gives_clear_error(tmp_path):
    variant("decoder-rotary-gqa").save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        lmkit.load(tmp_path / "m")


def test_flipped_bytes_are_detected(tmp_path):
    variant("decoder-rotary-gqa").save(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data, header intact
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        lmkit.load(tmp_path / "m")


def test_mismatch_lists_every_problem(tmp_path):
    variant("decoder-rotary-gqa").save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(decoder_layers=3, intermediate_size=96)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        lmkit.load(tmp_path / "m")
    msg = str(e.value)
    assert "missing tensors" in msg and "decoder.layers.2.attn.q.weight" in msg
    assert "shape mismatches" in msg and "decoder.layers.0.mlp.up.weight" in msg


def test_unexpected_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    variant("decoder-rotary-gqa").save(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(f)
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match="unexpected tensors.*extra.weight"):
        lmkit.load(tmp_path / "m")


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        lmkit.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        lmkit.load(tmp_path / "empty")
    variant("decoder-rotary-gqa").save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        lmkit.load(tmp_path / "m")


def test_new_head_on_pretrained_body(tmp_path):
    body = variant("encoder-learned")  # an MLM encoder
    body.save(tmp_path / "mlm")
    clf = lmkit.load(tmp_path / "mlm", head="classification", label_names=["neg", "pos"])
    assert clf.new_tensors == ["head.proj.bias", "head.proj.weight"]
    for name, value in body.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(clf.state_dict()[name], value), name
    assert clf.head.proj.weight.std() > 0  # initialised, not left empty
    out = clf(torch.randint(3, 500, (2, 5)), labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)
    tagger = lmkit.load(tmp_path / "mlm", head="token-classification", label_names=["O", "B", "I"])
    assert tagger(torch.randint(3, 500, (2, 5))).logits.shape == (2, 5, 3)


def test_new_head_still_needs_the_whole_body(tmp_path):
    variant("encoder-learned").save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["encoder_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensors"):
        lmkit.load(tmp_path / "m", head="classification", label_names=["a", "b"])
