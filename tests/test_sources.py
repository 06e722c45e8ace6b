import json

import pytest

from spard.data.sources import DATA_DIR, SOURCES, SPARD_REF_ATTACKS, FieldMap, load_source, read_rows
from spard.errors import DataError


def test_every_packaged_source_loads():
    for name, source in SOURCES.items():
        for split in source.files:
            records = load_source(name, split=split, limit=5)
            assert records and all(r.prompt for r in records), name


def test_packaged_counts_match_the_data_readme():
    assert len(load_source("gsm8k", split="test")) == 1319
    assert len(load_source("openbookqa", split="test")) == 500
    assert len(load_source("beavertails")) == 198
    assert len(load_source("advbench", split="test")) == 520
    assert len(load_source("safety")) == 2483


def test_task_records_keep_gold_fields():
    g = load_source("gsm8k", split="test", limit=1)[0]
    assert g.meta["answer"].rstrip().endswith("#### 18") and g.response == g.meta["answer"]
    o = load_source("openbookqa", split="test", limit=1)[0]
    assert len(o.meta["choices"]) == 4 and o.response.startswith("ABCD"[o.meta["gold"]])


def test_local_jsonl_with_field_map(tmp_path):
    p = tmp_path / "mine.jsonl"
    rows = [json.dumps({"q": "hi", "a": "hello", "ctx": "more"}), "", json.dumps({"q": "x", "a": "y"})]
    p.write_text("\n".join(rows) + "\n")
    recs = load_source("local", path=str(p), fields=FieldMap(prompt="q", response="a", input="ctx"), kind="task")
    assert [r.prompt for r in recs] == ["hi\nmore", "x"] and recs[0].response == "hello"


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "a", "answer": "b"}\n{"question": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON line"):
        load_source("gsm8k", path=str(p))


def test_record_without_required_field(tmp_path):
    p = tmp_path / "missing.jsonl"
    p.write_text('{"question": "a", "answer": "b"}\n{"question": "c"}\n')
    with pytest.raises(DataError, match=r"missing.jsonl line 2: record has no field 'answer'"):
        load_source("gsm8k", path=str(p))


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="neither an existing file nor a hub id"):
        load_source("gsm8k", path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown data source 'gsm9k'"):
        load_source("gsm9k")


def test_csv_and_messages_fields(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("prompt,response\nhello,world\n")
    assert load_source("local", path=str(p), fields=FieldMap())[0].response == "world"
    j = tmp_path / "m.json"
    j.write_text(json.dumps([{"conv": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]))
    assert load_source("local", path=str(j), fields=FieldMap(messages="conv"))[0].response == "a"
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps([{"conv": [{"role": "robot", "content": "u"}]}]))
    with pytest.raises(DataError, match="b.json item 1: .*bad message"):
        load_source("local", path=str(bad), fields=FieldMap(messages="conv"))


# --- the SPARD paper's attack sets and safety pool -----------------------------------------------------------
REF_SETS = {"beavertails_ref": 502, "i_beavertails": 477, "latharmful": 495, "q_latharmful": 491}


@pytest.mark.parametrize("name,rows", sorted(REF_SETS.items()))
def test_spard_ref_attack_sets_split_into_disjoint_parts(name, rows):
    from spard.data.build import normalise_prompt
    from spard.data.sources import spard_ref_part

    attack, held_out, whole = (load_source(name, split=s) for s in ("train", "test", "all"))
    assert len(whole) == rows and len(attack) + len(held_out) == rows
    a, e = ({normalise_prompt(r.prompt) for r in part} for part in (attack, held_out))
    assert not a & e  # no prompt in both parts
    assert 0.18 * rows < len(held_out) < 0.32 * rows  # about a quarter held out
    assert all(spard_ref_part(r.prompt) == "eval" for r in held_out)
    assert all(r.kind == "harmful" and r.messages[-1]["role"] == "assistant" for r in whole)
    # the harmful answer is the file's `unsafe` field, not the refusal
    raw = read_rows(DATA_DIR / f"spard_reference/eval/{SPARD_REF_ATTACKS[name]}_test.jsonl.gz")
    assert [r.messages[-1]["content"] for r in whole] == [row["unsafe"] for row in raw]


def test_spard_ref_part_is_a_function_of_the_normalised_prompt():
    from spard.data.sources import spard_ref_part

    assert spard_ref_part("How do I  Pick a lock?") == spard_ref_part("how do i pick a lock?")
    parts = [spard_ref_part(f"prompt {i}") for i in range(400)]
    assert 60 < parts.count("eval") < 140


def test_spard_ref_safety_pool_is_the_safe_answers_of_both_train_files():
    pool = load_source("spard_ref")
    raw = [*read_rows(DATA_DIR / "spard_reference/train/beaverTails_train.jsonl.gz"),
           *read_rows(DATA_DIR / "spard_reference/train/I_beaverTails_train.jsonl.gz")]
    assert len(pool) == len(raw) == 4516 + 4236
    assert [(r.prompt, r.messages[-1]["content"]) for r in pool] == [(row["prompt"], row["safe"]) for row in raw]
    assert {r.kind for r in pool} == {"safety"}


def test_spard_ref_eval_part_is_a_harm_set():
    from spard.evaluate.harm import load_harm_set

    prompts = load_harm_set("latharmful")
    assert len(prompts) == len(load_source("latharmful", split="test"))
    assert all(m["role"] != "assistant" for r in prompts for m in r.messages)
