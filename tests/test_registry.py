"""Plugins register themselves: a defense, attack, task or judge defined in one place is usable by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from spard.args import DefenseArgs, check_range
from spard.config import field_docs, load_config
from spard.defenses.base import Defense
from spard.errors import ConfigError
from spard.registry import REGISTRIES, Registry, build


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_plugin_has_documented_args_named_after_it(kind):
    registry = REGISTRIES[kind]
    assert registry.names(), f"no {kind} registered"
    for name in registry.names():
        cls = registry.get(name)
        args = cls.Args
        assert args.__dataclass_fields__["name"].default == name
        docs = field_docs(args)
        missing = [f.name for f in dataclasses.fields(args) if not docs.get(f.name)]
        assert not missing, f"{kind} {name}: fields without a docstring: {missing}"


def test_a_new_defense_is_one_class_and_its_options_load_from_config():
    from spard.defenses.base import register

    @dataclass
    class ProbeArgs(DefenseArgs):
        name: str = "probe-defense"
        """Defense name."""
        strength: float = 1.0
        """How hard to probe."""

        def __post_init__(self) -> None:
            check_range("strength", self.strength, 0.0)

    @register
    class Probe(Defense):
        name = "probe-defense"
        Args = ProbeArgs

    cfg = load_config(None, ["defense.name=probe-defense", "defense.strength=2"])
    assert cfg.defense == ProbeArgs(strength=2.0)
    assert isinstance(build(cfg.defense), Probe) and build(cfg.defense).args.strength == 2.0
    with pytest.raises(ConfigError, match=r"override 'defense.strength=-1'.*defense.strength=-1.0: must be in"):
        load_config(None, ["defense.name=probe-defense", "defense.strength=-1"])


def test_unknown_plugin_names_suggest_the_closest():
    with pytest.raises(ConfigError, match=r"unknown defense 'sprad'; did you mean 'spard'\?"):
        load_config(None, ["defense.name=sprad"])
    with pytest.raises(ConfigError, match=r"unknown attack 'harmful-mix'; did you mean 'harmful_mix'\?"):
        load_config(None, ["attack.name=harmful-mix"])
    with pytest.raises(ConfigError, match=r"unknown judge 'keywords'; did you mean 'keyword'\?"):
        load_config(None, ["eval.judge=keywords"])
    with pytest.raises(ConfigError, match=r"unknown eval task 'gsm8'; did you mean 'gsm8k'\?"):
        load_config(None, ["eval.tasks=[gsm8]"])


def test_a_plugin_must_name_itself_consistently():
    registry: Registry = Registry("thing", "spard.defenses")

    @dataclass
    class OtherArgs(DefenseArgs):
        name: str = "other"
        """Name."""

    class Mismatch(Defense):
        name = "mismatch"
        Args = OtherArgs

    with pytest.raises(TypeError, match="defaults to 'other'"):
        registry.register(Mismatch)


def test_switching_a_plugin_by_override_drops_the_files_options(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  judge: {name: openai, model: gpt-x}\n")
    cfg = load_config(path, ["eval.judge=keyword"])
    assert cfg.eval.judge.name == "keyword"
    assert "ignoring the config file's options of judge 'openai': eval.judge.model" in caplog.text
    kept = load_config(path, ["eval.judge.max_retries=1"])  # same plugin: the file's options stay
    assert (kept.eval.judge.model, kept.eval.judge.max_retries) == ("gpt-x", 1)


def test_resolving_a_config_imports_only_the_plugins_it_names():
    import subprocess
    import sys

    # spard show-config answers without the model stack: the default plugins (sft, harmful_mix, keyword, gsm8k,
    # openbookqa, align none) import neither torch nor transformers, and no other defense is loaded
    code = ("import sys\nfrom spard.config import load_config\nload_config(None)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'spard.defenses.spard', 'spard.defenses.safegrad')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_plugin_module_imports_torch_and_every_shipped_config_resolves_without_it():
    import subprocess
    import sys

    # Every plugin of every kind keeps its tensor code behind imports inside the functions that run it, so
    # `spard show-config` of any shipped config (spard, safegrad, lisa, safelora, an alignment defense...)
    # answers without loading torch.
    code = (
        "import sys, glob\n"
        "from spard.config import load_config\n"
        "from spard.registry import REGISTRIES\n"
        "names = {kind: r.names() for kind, r in REGISTRIES.items()}\n"
        "for path in sorted(glob.glob('configs/*.yaml')):\n"
        "    load_config(path)\n"
        "for name in names['defense']:\n"
        "    load_config(None, [f'defense.name={name}'])\n"
        "for name in names['align_defense']:\n"
        "    load_config(None, [f'align.defense.name={name}'])\n"
        "print(len(names['defense']), len(names['align_defense']),"
        " sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n_defenses, n_align, loaded = out.stdout.strip().split(" ", 2)
    assert int(n_defenses) >= 7 and int(n_align) >= 4, out.stdout
    assert loaded == "[]", out.stdout + out.stderr
