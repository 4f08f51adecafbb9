"""Configs: presets load, overrides apply, bad input is one clear error."""

import pytest

from somoe.config import ConfigError, ModelConfig, RunConfig, from_dict, list_presets, load_config, to_dict


@pytest.mark.parametrize("name", list_presets())
def test_every_shipped_preset_loads_and_round_trips(name):
    cfg = load_config(preset=name)
    assert cfg.name == name
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # what a run folder saves loads back identically


def test_overrides_are_typed():
    cfg = load_config(preset="debug", overrides=["train.lr=4e-4", "model.n_layers=3", "train.betas=[0.8,0.9]",
                                                 "train.compile=true", "data.mode=padded"])
    assert cfg.train.lr == 4e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layers == 3
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.train.compile is True
    assert cfg.data.mode == "padded"


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ("model.n_layers=two", "model.n_layers='two' must be an integer"),
    ("data.mode=stacked", "data.mode='stacked' is not allowed"),
    ("model.d_model=90", "not divisible by model.n_heads"),
    ("model.some.top_k=99", "top_k=99 exceeds model.some.num_experts"),
    ("model.moe.top_k=9", "top_k=9 exceeds model.moe.num_experts"),
    ("data.seq_len=4096", "exceeds model.max_seq_len"),
    ("train.batch_size=10", "not divisible by train.grad_accum"),
    ("nonsense", "has no '='"),
])
def test_bad_values_are_one_line_errors(override, message):
    extra = ["train.grad_accum=4"] if "batch_size" in override else []
    with pytest.raises(ConfigError) as err:
        load_config(preset="debug", overrides=[override, *extra])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: .*debug"):
        load_config(preset="nope")


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config_file=str(bad))


def test_config_file_with_inheritance(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("inherit: debug\nname: mine\ntrain:\n  lr: 0.01\n")
    cfg = load_config(config_file=str(f))
    assert cfg.name == "mine" and cfg.train.lr == 0.01 and cfg.model.d_model == 64


def test_swiglu_hidden_width_rounds_to_64():
    cfg = from_dict(ModelConfig, {"backbone": "smollm", "positions": "rope", "activation": "swiglu",
                                  "d_model": 192})
    assert cfg.ffn_hidden == 512  # 8/3 * 192 = 512
