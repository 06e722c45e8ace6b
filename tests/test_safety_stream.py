"""The shared safety-batch stream of SafeGrad, SPARD and later defenses."""

from __future__ import annotations

import pytest

from spard.data.safety import SafetyStream


def _features(n: int) -> list[dict[str, list[int]]]:
    return [{"input_ids": [i + 1, 0], "attention_mask": [1, 1], "labels": [-100, i + 1]} for i in range(n)]


def test_each_pass_visits_every_example_once_in_a_fresh_order():
    stream = SafetyStream(_features(10), seed=3, pad_id=0)
    drawn = [i for _ in range(5) for i in stream.next_indices(4)]  # 20 draws = 2 passes
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert drawn[:10] != drawn[10:]
    other = SafetyStream(_features(10), seed=4, pad_id=0)
    assert other.next_indices(4) != SafetyStream(_features(10), seed=3, pad_id=0).next_indices(4)


def test_rank_shares_add_up_to_the_single_process_batch():
    single = SafetyStream(_features(7), seed=1, pad_id=0)
    ranks = [SafetyStream(_features(7), seed=1, pad_id=0) for _ in range(2)]
    for _ in range(4):
        whole = single.next_indices(3)
        shares = [s.next_indices(3, rank=r, world=2) for r, s in enumerate(ranks)]
        assert sorted(shares[0] + shares[1]) == sorted(whole)
    assert single.cursor == ranks[0].cursor == ranks[1].cursor == 12


def test_resume_from_the_cursor_draws_what_the_uninterrupted_stream_draws():
    full = SafetyStream(_features(5), seed=2, pad_id=0)
    expected = [full.next_indices(2) for _ in range(6)]
    first = SafetyStream(_features(5), seed=2, pad_id=0)
    got = [first.next_indices(2) for _ in range(3)]
    resumed = SafetyStream(_features(5), seed=2, pad_id=0)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_indices(2) for _ in range(3)]
    assert got == expected


def test_batches_are_padded_with_ignored_labels():
    stream = SafetyStream([{"input_ids": [5], "attention_mask": [1], "labels": [5]}, *_features(1)], seed=0, pad_id=9)
    batch = stream.next_batch(2, "cpu")
    assert batch is not None and batch["input_ids"].shape == (2, 2)
    assert (batch["labels"] == -100).sum() >= 1 and 9 in batch["input_ids"].tolist()[0] + batch["input_ids"].tolist()[1]
    assert stream.next_batch(1, "cpu", rank=1, world=2) is None  # an empty share


def test_an_empty_stream_is_refused():
    with pytest.raises(ValueError):
        SafetyStream([], seed=0, pad_id=0)


def test_stream_owner_restores_the_position_before_or_after_the_stream_exists():
    from spard.data.safety import StreamOwner

    early, late = StreamOwner(), StreamOwner()
    early.restore_stream_cursor(5)  # a checkpoint loaded before setup builds the stream
    assert early.stream_cursor == 5
    assert early.start_stream(_features(4), seed=1, pad_id=None).cursor == 5
    late.start_stream(_features(4), seed=1, pad_id=0).next_indices(3)
    assert late.stream_cursor == 3
    late.restore_stream_cursor(5)  # ... or after
    assert late.stream is not None and late.stream.next_indices(2) == early.stream.next_indices(2)
    assert StreamOwner().stream_cursor == 0 and StreamOwner().stream is None
