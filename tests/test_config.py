import pytest

from toto.config import PRESETS, build_config, config_from_dict, preset
from toto.errors import ConfigError


def test_presets_match_spec_shapes():
    spec = {"base": (12, 12, 768), "large": (16, 16, 1024), "1b": (22, 16, 2048)}
    for name, (layers, heads, width) in spec.items():
        m = preset(name).model
        assert (m.n_layers, m.n_heads, m.dim) == (layers, heads, width)
    assert set(PRESETS) >= {"tiny", "base", "large", "1b"}


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\nmodel:\n  n_layers: 3\ntrain:\n  lr: 0.01\n")
    cfg = build_config(None, str(f), ["train.lr=5e-4", "model.tie_embeddings=true", "data.path=/x"])
    assert cfg.model.n_layers == 3 and cfg.model.dim == PRESETS["tiny"]["model"]["dim"]
    assert cfg.train.lr == 5e-4 and cfg.model.tie_embeddings is True and cfg.data.path == "/x"
    # a saved config round-trips
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, field", [
    ("model.dim=100", "model.dim"),          # 100 not divisible by 12 heads
    ("model.n_heads=0", "model.n_heads"),
    ("train.lr=-1", "train.lr"),
    ("train.beta2=1.5", "train.beta2"),
    ("model.n_layers=2.5", "model.n_layers"),
    ("model.nope=1", "model.nope"),
    ("train.dtype=fp8", "train.dtype"),
    ("bogus.x=1", "bogus"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config("base", None, [override])


def test_odd_head_dim_rejected():
    with pytest.raises(ConfigError, match="even"):
        build_config("tiny", None, ["model.dim=12", "model.n_heads=4"])


def test_missing_or_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config(None, str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        build_config(None, str(bad))


def test_shipped_yaml_presets_load():
    from pathlib import Path

    root = Path(__file__).parents[1] / "configs"
    for name in ("tiny", "base", "large", "1b"):
        cfg = build_config(None, str(root / f"{name}.yaml"))
        assert cfg == build_config(name), name


def test_threads_option_on_every_command(capsys):
    import torch

    from toto.cli import COMMANDS, build_parser, main

    parser = build_parser()
    assert set(parser.subcommands.choices) == set(COMMANDS)
    for leaf in parser.leaves():  # every command, and every action of a grouped command
        assert any("--threads" in a.option_strings for a in leaf._actions), leaf.prog
    before = torch.get_num_threads()
    try:
        assert main(["params", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert main(["params", "--threads", "0"]) == 2
    assert "argument --threads: must be > 0, got 0" in capsys.readouterr().err
