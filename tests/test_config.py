"""ModelConfig: presets, JSON round trip, validation messages."""

import pytest

import lmkit
from lmkit.config import PRESETS, ModelConfig
from lmkit.flops import num_parameters


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(tmp_path, name):
    cfg = lmkit.preset(name)
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg


def test_published_parameter_counts():
    # Reference sizes of the original models (bert-base incl. its MLM head).
    assert num_parameters(lmkit.preset("gpt2")) == 124_439_808
    assert num_parameters(lmkit.preset("t5-small")) == 60_506_624
    assert round(num_parameters(lmkit.preset("bert-base")) / 1e6) == 110
    assert round(num_parameters(lmkit.preset("bart-base")) / 1e6) == 139


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=100, num_heads=3), "hidden size 100 is not divisible by 3 heads"),
    (dict(num_heads=8, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(norm="batchnorm"), "norm='batchnorm' is not supported"),
    (dict(family="encoder-decoder", encoder_layers=2, decoder_layers=2), "decoder_start_id"),
    (dict(family="encoder", decoder_layers=0, encoder_layers=0), "encoder_layers > 0"),
    (dict(position="rotary", rotary_fraction=0.2, hidden_size=64, num_heads=4),
     "even, non-zero"),
    (dict(head="classification"), "needs label_names"),
    (dict(dropout=1.5), "dropout must be in"),
])
def test_validation_messages(fields, message):
    base = dict(family="decoder", decoder_layers=1)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**base, **fields})


def test_unknown_fields_and_presets():
    with pytest.raises(ValueError, match="unknown config fields"):
        ModelConfig.from_dict({"family": "decoder", "decoder_layers": 1, "n_embd": 3})
    with pytest.raises(ValueError, match="unknown preset 'bert-huge'"):
        lmkit.preset("bert-huge")


def test_bad_json(tmp_path):
    (tmp_path / "c.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "c.json")


def test_config_json_of_earlier_versions_still_loads(tmp_path):
    # Class names were stored as "labels" before the field became `label_names` (the word
    # `labels` now always means target ids).
    cfg = lmkit.preset("tiny-encoder", head="classification", label_names=["neg", "pos"])
    old = {("labels" if k == "label_names" else k): v for k, v in cfg.to_dict().items()}
    assert "labels" in old and "label_names" not in old
    assert ModelConfig.from_dict(old) == cfg
    assert ModelConfig.from_dict(old).num_labels == 2
