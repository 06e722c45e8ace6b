from pathlib import Path

import pytest

from spard.config import RunConfig, config_to_yaml, field_docs, load_config
from spard.errors import ConfigError, SpardError

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").rglob("*.yaml")
                 if "accelerate" not in p.parts)  # configs/accelerate/ are accelerate's own (tests/test_fsdp.py)


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path_factory):
    if "bench" in path.parts:  # their own schema (tests/test_benchmark.py loads them); a run command says so
        with pytest.raises(ConfigError, match="this is a benchmark config"):
            load_config(path)
        return
    cfg = load_config(path)
    again = load_config(write(tmp_path_factory.mktemp("c"), config_to_yaml(cfg)))
    assert again == cfg  # what a run stores in config.yaml loads back to the same config



def test_the_benchmark_key_list_matches_the_benchmark_config():
    """config.py cannot import BenchConfig (it sits below the benchmark package), so it lists the keys that only a
    benchmark config has by hand; a key added to BenchConfig must be added there too."""
    import dataclasses

    from spard.benchmark.grid import BenchConfig
    from spard.config import _BENCH_KEYS, _RUN_SECTIONS

    assert _BENCH_KEYS == {f.name for f in dataclasses.fields(BenchConfig)} - set(_RUN_SECTIONS)


def test_kl_direction_choices_agree():
    """The SafeGrad plugin checks its option against its own copy of the choices (it must not import the torch
    module at import time); the KL function checks against the other."""
    from spard.alignment_kl import KL_DIRECTIONS as kl_math_choices
    from spard.defenses.safegrad import KL_DIRECTIONS as plugin_choices

    assert plugin_choices == kl_math_choices

def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "attack:\n  harmful_ratio: 0.2\ntrain:\n  lr: 1.0e-4\n")
    cfg = load_config(p, ["defense.name=safeinstr", "defense.safety_examples=7", "train.max_steps=5",
                          "lora.target_modules=q_proj,v_proj"])
    assert cfg.attack.harmful_ratio == 0.2 and cfg.train.lr == 1e-4 and cfg.train.max_steps == 5
    assert cfg.defense.name == "safeinstr" and cfg.defense.safety_examples == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.trust_remote_code is False  # safe default


def test_every_field_has_a_docstring():
    import dataclasses

    from spard.config import AlignArgs, AttackArgs, DataArgs, LoraArgs, ModelArgs, TrainArgs

    for cls in (ModelArgs, LoraArgs, DataArgs, AttackArgs, TrainArgs, AlignArgs, RunConfig):
        missing = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


@pytest.mark.parametrize("text,overrides,message", [
    ("atack:\n  harmful_ratio: 0.1\n", [], r"c.yaml: unknown config key 'atack'"),
    ("attack:\n  harmful_ratoi: 0.1\n", [],
     r"unknown config key 'attack.harmful_ratoi'; did you mean 'attack.harmful_ratio'"),
    ("", ["attack.harmful_ratio=1.5"],
     r"override 'attack.harmful_ratio=1.5': attack.harmful_ratio=1.5: must be in \[0.0, 1.0\]"),
    ("attack:\n  harmful_ratio: -0.1\n", [], r"c.yaml: attack.harmful_ratio=-0.1: must be in"),
    ("train:\n  batch_size: eight\n", [], r"c.yaml: train.batch_size='eight': expected an integer"),
    ("train:\n  resume: 3\n", [], r"train.resume=3: expected true or false"),
    ("", ["defense.name=spardd"], r"defense.name='spardd': unknown defense 'spardd'"),
    ("", ["defense.safety_examples=3"], r"unknown config key 'defense.safety_examples'"),
    ("", ["noequals"], r"override 'noequals': expected key=value"),
    ("attack: 3\n", [], r"attack must be a mapping"),
    ("- a\n- b\n", [], r"top level must be a mapping"),
    ("attack: [unclosed\n", [], r"not valid YAML"),
])
def test_config_errors_name_file_key_and_value(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(SpardError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    assert issubclass(ConfigError, ValueError)


def test_switching_defense_on_the_command_line_drops_the_files_defense_options(tmp_path, caplog):
    p = write(tmp_path, "defense:\n  name: safeinstr\n  safety_fraction: 0.2\n")
    cfg = load_config(p, ["defense.name=sft"])
    assert cfg.defense.name == "sft"
    assert "ignoring the config file's options of defense 'safeinstr': defense.safety_fraction" in caplog.text
    with pytest.raises(ConfigError, match="unknown config key 'defense.safety_fraction'"):
        load_config(write(tmp_path, "defense:\n  name: sft\n  safety_fraction: 0.2\n"))
