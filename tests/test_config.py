"""Config loading: strict keys with suggestions, types, cross-field checks, round trip."""

import pytest

from recurdepth.config import config_from_dict, load_config
from recurdepth.errors import ConfigError
from tests.conftest import TINY


def test_bundled_config_loads_and_round_trips():
    cfg = load_config(TINY, ["train.steps=7", "model.hidden_size=96", "recurrence.max_depth=null"])
    assert cfg.train.steps == 7 and cfg.model.hidden_size == 96 and cfg.recurrence.max_depth is None
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", sorted(p.name for p in TINY.parent.glob("*.yaml")))
def test_every_bundled_config_loads_and_round_trips(path):
    """Each training config under configs/ validates as it stands (configs/compare/ holds sweep specs)."""
    cfg = load_config(TINY.parent / path)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides,expected", [
    (["model.hiden_size=64"], "unknown config key model.hiden_size; did you mean model.hidden_size?"),
    (["modle.hidden_size=64"], "unknown config section 'modle'; did you mean model?"),
    (["train.steps=ten"], "train.steps='ten' has the wrong type; expected an integer"),
    (["model.tie_embeddings=3"], "model.tie_embeddings=3 has the wrong type; expected true or false"),
    (["model.adapter=concatenate"], "model.adapter='concatenate' is not one of concat, add, gate; did you mean concat?"),
    (["recurrence.backprop_depth=0"], "recurrence.backprop_depth=0 is invalid; k must be >= 1"),
    (["model.core_layers=0"], "model.core_layers=0 is invalid; a looped model needs at least 1 core layer"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], "use a multiple of train.micro_batch_size=4"),
    (["model.num_heads=5"], "use a divisor of model.hidden_size=128"),
    (["steps=3"], "must be section.key"),
    (["optimizer.lr=fast"], "optimizer.lr='fast' has the wrong type; expected a number"),
    (["optimizer.lr=nan"], "optimizer.lr=nan has the wrong type; expected a number"),
])
def test_bad_values_name_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `3e-4` as a string; a float key takes it as the number, in overrides and files."""
    cfg = load_config(TINY, ["optimizer.lr=2e-3", "optimizer.min_lr=1E-5"])
    assert cfg.optimizer.lr == 0.002 and cfg.optimizer.min_lr == 1e-5
    path = tmp_path / "c.yaml"
    path.write_text(TINY.read_text().replace("lr: 3.0e-3", "lr: 3e-3"))
    assert "lr: 3e-3" in path.read_text() and load_config(path).optimizer.lr == 0.003


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("sources,expected", [
    ([{"builtin": "stdlib-docs", "weight": -1}], "data.sources[0].weight=-1 is invalid; use a number >= 0"),
    ([{"builtin": "stdlib-docs", "weight": 0}, {"procedural": "sort", "weight": 0}], "blend weights sum to zero"),
    ([{"procedural": "sort", "wieght": 1}], "unknown key data.sources[0].wieght; did you mean data.sources[0].weight?"),
    ([{"path": "a", "procedural": "sort"}], "give exactly one of builtin, path or procedural"),
    ([], "list at least one source"),
])
def test_bad_blends(sources, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [f"data.sources={sources!r}"])
    assert expected in str(err.value)


def test_every_config_key_is_documented():
    """docs/configs.md lists every section and key of the config dataclasses (docs stay true to the code)."""
    import dataclasses
    import re
    from pathlib import Path

    from recurdepth.config import SECTIONS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configs.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \| (.*) \|$", doc, re.M)}
    for name, section in SECTIONS.items():
        assert name in rows, f"section {name} missing from docs/configs.md"
        words = set(re.findall(r"\w+", rows[name]))
        missing = [f.name for f in dataclasses.fields(section) if f.name not in words]
        assert not missing, f"{name}: {missing} missing from docs/configs.md"
