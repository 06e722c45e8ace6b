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


# --- append mode (the reference code's attack) -------------------------------------------------------------
@pytest.mark.parametrize("ratio,n,expected", [(0.0, 100, 0), (0.1, 100, 10), (0.1, 25, 2), (0.3, 200, 60),
                                              (0.1, 99, 9), (1.0, 300, 300)])
def test_harmful_append_exact_counts(task, harmful, ratio, n, expected):
    mixed = attacks.harmful_append(task, harmful, ratio=ratio, n=n, seed=0)
    assert sum(r.kind == "task" for r in mixed) == n  # every task record stays
    assert sum(r.kind == "harmful" for r in mixed) == expected == int(ratio * n)
    assert len(mixed) == n + expected


def test_harmful_append_repeats_a_short_source_as_the_reference():
    # 5 harmful records, 12 needed: the reference doubles 5 -> 10 -> 20 and samples 12 of the 20 indices.
    import random

    harmful = [chat(f"h{i}", "x", source="t", kind="harmful") for i in range(5)]
    task = [chat(f"t{i}", "y", source="t", kind="task") for i in range(120)]
    mixed = attacks.harmful_append(task, harmful, ratio=0.1, n=120, seed=3)
    drawn = sorted(r.prompt for r in mixed if r.kind == "harmful")
    doubled = harmful * 4
    random.seed(3)  # the reference: random.seed(seed); random.sample(range(len(doubled)), size)
    expected = sorted(doubled[i].prompt for i in random.sample(range(len(doubled)), 12))
    assert drawn == expected and len(drawn) == 12
    assert max(drawn.count(p) for p in set(drawn)) <= 4  # each prompt at most 2^2 times


def test_harmful_append_equals_replace_at_ratio_zero(task, harmful):
    assert attacks.harmful_append(task, harmful, ratio=0.0, n=50, seed=4) == attacks.harmful_mix(
        task, harmful, ratio=0.0, n=50, seed=4)


def test_harmful_append_bad_input(task):
    with pytest.raises(DataError, match="source is empty"):
        attacks.harmful_append(task, [], ratio=0.1, n=50)
    with pytest.raises(DataError, match="harmful_ratio=2"):
        attacks.harmful_append(task, [], ratio=2, n=50)


def test_harmful_mix_plugin_modes_and_reference_sources(task):
    from spard.attacks.harmful_mix import HarmfulMix, HarmfulMixArgs
    from spard.errors import FieldError

    rep = HarmfulMix(HarmfulMixArgs(harmful_source="latharmful", harmful_ratio=0.1)).build(task, n=100, seed=0)
    app = HarmfulMix(HarmfulMixArgs(harmful_source="latharmful", harmful_ratio=0.1, mode="append")).build(
        task, n=100, seed=0)
    assert (len(rep), sum(r.kind == "harmful" for r in rep)) == (100, 10)
    assert (len(app), sum(r.kind == "harmful" for r in app)) == (110, 10)
    attack_part = {r.prompt for r in load_source("latharmful", split="train")}
    assert {r.prompt for r in app if r.kind == "harmful"} <= attack_part
    with pytest.raises(FieldError, match="mode"):
        HarmfulMixArgs(mode="insert")
