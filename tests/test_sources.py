import json

import pytest

from spard.data.sources import SOURCES, FieldMap, load_source
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
    with pytest.raises(DataError, match=r"missing.jsonl record 1: record has no field 'answer'"):
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
    with pytest.raises(DataError, match="b.json record 0: .*bad message"):
        load_source("local", path=str(bad), fields=FieldMap(messages="conv"))
