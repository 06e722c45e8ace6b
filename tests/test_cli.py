import subprocess
import sys

import pytest
import yaml

from spard.cli import main
from spard.config import ModelArgs
from spard.errors import ModelError
from spard.models import resolve_model_path


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("align", "train", "run", "eval", "show-config"):
        assert cmd in out


def test_show_config_applies_overrides(capsys):
    assert main(["show-config", "configs/quickstart.yaml", "attack.harmful_ratio=0.3", "defense.name=sft"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["attack"]["harmful_ratio"] == 0.3 and cfg["defense"] == {"name": "sft"}


def test_bad_input_is_one_clear_error(capsys):
    assert main(["show-config", "configs/quickstart.yaml", "attack.harmful_ratio=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spard: error: override 'attack.harmful_ratio=2': attack.harmful_ratio=2")
    assert "Traceback" not in err
    assert main(["train", "configs/nope.yaml"]) == 2
    assert "config file not found: configs/nope.yaml" in capsys.readouterr().err


def test_a_bench_config_given_to_a_run_command_points_at_spard_bench(capsys):
    for cmd in ("show-config", "train", "run"):
        assert main([cmd, "configs/bench/smoke.yaml"]) == 2
        err = capsys.readouterr().err
        assert "configs/bench/smoke.yaml: this is a benchmark config" in err, err
        assert "spard bench configs/bench/smoke.yaml" in err and "unknown config key" not in err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "spard", "--help"], capture_output=True, text=True, check=True)
    assert "show-config" in out.stdout


def test_model_path_that_does_not_exist(tmp_path):
    with pytest.raises(ModelError, match="no such local path"):
        resolve_model_path(str(tmp_path / "missing-model"))
    with pytest.raises(ModelError, match="no such local path"):
        resolve_model_path("./relative/missing")
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"  # a hub id passes through
    assert ModelArgs().trust_remote_code is False
