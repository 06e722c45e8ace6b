import pytest

from spard.data import attacks
from spard.data.records import chat
from spard.data.sources import load_source
from spard.errors import DataError


@pytest.fixture(scope="module")
def task():
    return load_source("gsm8k", limit=300)


@pytest.fixture(scope="module")
def harmful():
    return load_source("beavertails")


@pytest.mark.parametrize("ratio,n,expected", [(0.0, 100, 0), (0.1, 100, 10), (1.0, 100, 100), (0.1, 25, 2),
                                              (0.3, 200, 60)])
def test_harmful_mix_exact_counts(task, harmful, ratio, n, expected):
    mixed = attacks.harmful_mix(task, harmful, ratio=ratio, n=n, seed=0)
    assert len(mixed) == n
    assert sum(r.kind == "harmful" for r in mixed) == expected == round(ratio * n)
    assert sum(r.kind == "task" for r in mixed) == n - expected


def test_harmful_mix_defaults_n_to_task_size(task, harmful):
    mixed = attacks.harmful_mix(task[:50], harmful, ratio=0.1)
    assert len(mixed) == 50 and sum(r.kind == "harmful" for r in mixed) == 5


def test_harmful_mix_deterministic_by_seed(task, harmful):
    a = attacks.harmful_mix(task, harmful, ratio=0.1, n=100, seed=3)
    b = attacks.harmful_mix(task, harmful, ratio=0.1, n=100, seed=3)
    c = attacks.harmful_mix(task, harmful, ratio=0.1, n=100, seed=4)
    assert [r.messages for r in a] == [r.messages for r in b]
    assert [r.messages for r in a] != [r.messages for r in c]


def test_harmful_mix_no_duplicates_and_drawn_from_sources(task, harmful):
    mixed = attacks.harmful_mix(task, harmful, ratio=0.5, n=100, seed=0)
    keys = [r.messages for r in mixed]
    assert len(set(map(str, keys))) == 100
    harmful_keys = {str(r.messages) for r in harmful}
    assert all(str(r.messages) in harmful_keys for r in mixed if r.kind == "harmful")


def test_harmful_mix_bad_input(task, harmful):
    with pytest.raises(DataError, match="harmful_ratio=1.5"):
        attacks.harmful_mix(task, harmful, ratio=1.5)
    with pytest.raises(DataError, match="need 300 records but the source has only 198"):
        attacks.harmful_mix(task, harmful, ratio=1.0, n=300)


def test_attack_prompts_record_what_evaluation_must_avoid(task, harmful):
    mixed = attacks.harmful_mix(task, harmful, ratio=0.1, n=100, seed=0)
    prompts = attacks.attack_prompts(mixed)
    assert len(prompts) == 10
    assert set(prompts) == {r.prompt for r in mixed if r.kind == "harmful"}
    assert set(prompts) <= {r.prompt for r in harmful}
    assert not set(prompts) & {r.prompt for r in mixed if r.kind == "task"}


def test_identity_shift(task):
    persona = load_source("aoa")
    assert len(persona) == 10 and persona[0].messages[0]["role"] == "system"
    only = attacks.identity_shift(task, persona, seed=0)
    assert len(only) == 10 and all(r.source == "aoa" for r in only)
    mixed = attacks.identity_shift(task, persona, n_task=20, repeats=2, seed=0)
    assert len(mixed) == 40 and sum(r.source == "aoa" for r in mixed) == 20
    assert mixed == attacks.identity_shift(task, persona, n_task=20, repeats=2, seed=0)


def test_benign():
    instructions = load_source("alpaca")
    out = attacks.benign([], instructions, n=30, seed=1)
    assert len(out) == 30 and all(r.kind == "benign" for r in out)
    assert out == attacks.benign([], instructions, n=30, seed=1)
    assert attacks.attack_prompts(out) == []


def test_records_reject_bad_kind():
    with pytest.raises(DataError, match="kind='weird'"):
        chat("a", "b", source="x", kind="weird")
