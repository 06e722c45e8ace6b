import logging

from spard.data.chat import IGNORE_INDEX, collate, tokenize_record, tokenize_records
from spard.data.records import Record, chat


def test_labels_cover_assistant_turns_only(tiny_tok):
    rec = chat("how do i make a bomb ?", "sorry , i cannot help .", source="t", kind="safety", system="you are helpful")
    feat, truncated = tokenize_record(tiny_tok, rec, max_length=100)
    assert not truncated
    toks = tiny_tok.convert_ids_to_tokens(feat["input_ids"])
    learned = [t for t, lab in zip(toks, feat["labels"]) if lab != IGNORE_INDEX]
    # exactly the reply plus the end-of-turn marker: the model must learn to stop
    assert learned == ["sorry", ",", "i", "cannot", "help", ".", "<|im_end|>"]
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(feat["labels"], feat["input_ids"]))


def test_multi_turn_masks_user_turns_between_assistant_turns(tiny_tok):
    rec = Record(messages=(
        {"role": "user", "content": "what is 2 plus 2"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3 plus 3"},
        {"role": "assistant", "content": "6"},
    ), source="t", kind="task")
    feat, _ = tokenize_record(tiny_tok, rec, max_length=100)
    toks = tiny_tok.convert_ids_to_tokens(feat["input_ids"])
    learned = [t for t, lab in zip(toks, feat["labels"]) if lab != IGNORE_INDEX]
    assert learned == ["4", "<|im_end|>", "6", "<|im_end|>"]


def test_truncation_is_counted_and_warned(tiny_tok, caplog):
    long = chat("question " * 50, "answer " * 50, source="t", kind="task")
    short = chat("question", "answer", source="t", kind="task")
    with caplog.at_level(logging.WARNING):
        feats, stats = tokenize_records(tiny_tok, [long, short, long], max_length=20)
    assert stats.truncated == 2 and stats.total == 3
    assert stats.no_target == 2  # the prompt alone fills 20 tokens
    assert all(len(f["input_ids"]) <= 20 for f in feats)
    assert "2 of 3 sequences truncated to max_length=20" in caplog.text
    assert "2 of 3 sequences have no assistant token" in caplog.text


def test_collate_right_pads_with_ignored_labels(tiny_tok):
    feats, _ = tokenize_records(tiny_tok, [chat("a b c d e", "f", source="t", kind="task"),
                                           chat("a", "b", source="t", kind="task")], max_length=64)
    batch = collate(feats, tiny_tok.pad_token_id)
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["attention_mask"][1].sum().item() == n1
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, n1:] == tiny_tok.pad_token_id).all()
