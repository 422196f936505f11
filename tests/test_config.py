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
    (dict(activation_dropout=-0.1), "activation_dropout must be in"),
    (dict(layer_types=["global", "nearby"]), "layer_types holds \\['nearby'\\]"),
    (dict(layer_types=["global", "local"]), "names 2 blocks but the model has 1"),
    (dict(layer_types=["local"]), "window is not set"),
    (dict(window=0), "window must be a positive number"),
    (dict(first_attn_norm=False, norm_position="post"), "needs norm_position='pre'"),
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
    (tmp_path / "c.json").write_text('{"family": "decoder",\n"hidden_size": }')
    with pytest.raises(lmkit.ConfigError, match=r"c.json:2: invalid JSON"):
        ModelConfig.from_json(tmp_path / "c.json")
    (tmp_path / "c.json").write_text('{"family": "decoder", "hidden_size": "64"}')
    with pytest.raises(lmkit.ConfigError, match=r"c.json: "):  # a string, not a number
        ModelConfig.from_json(tmp_path / "c.json")


def test_config_json_of_earlier_versions_still_loads(tmp_path):
    # Class names were stored as "labels" before the field became `label_names` (the word
    # `labels` now always means target ids).
    cfg = lmkit.preset("tiny-encoder", head="classification", label_names=["neg", "pos"])
    old = {("labels" if k == "label_names" else k): v for k, v in cfg.to_dict().items()}
    assert "labels" in old and "label_names" not in old
    assert ModelConfig.from_dict(old) == cfg
    assert ModelConfig.from_dict(old).num_labels == 2


def test_fields_added_later_default_to_what_earlier_versions_computed(tmp_path):
    """A config.json written before the local-attention and head-bias fields existed loads
    with the behaviour of that version; the new fields round-trip through JSON when set."""
    from lmkit.config import ADDED
    cfg = lmkit.preset("tiny-encoder", head="classification", label_names=["a", "b"])
    old = {k: v for k, v in cfg.to_dict().items() if k not in ADDED}
    assert ModelConfig.from_dict(old) == cfg
    with pytest.raises(ValueError, match="config fields missing: \\['vocab_size'\\]"):
        ModelConfig.from_dict({k: v for k, v in old.items() if k != "vocab_size"})
    local = cfg.replace(position="rotary", norm_position="pre", final_norm=True,
                        first_attn_norm=False, norm_bias=False, window=3,
                        layer_types=["local", "global"], local_rope_theta=10.0,
                        classifier_hidden=True, classifier_norm=True, classifier_bias=False,
                        head_dense_bias=False)
    local.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == local
    assert [local.layer_type(i) for i in range(2)] == ["local", "global"]
    assert cfg.replace(window=4).layer_type(1) == "local"  # no layer_types: every block
