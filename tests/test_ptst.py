"""PTST: training records lose their system turn, evaluation prompts gain the safety system prompt."""

from __future__ import annotations

import json

from spard.args import EvalArgs
from spard.config import load_config
from spard.data.records import Record, chat, with_system_prompt
from spard.defenses.ptst import PTST, PTST_SAFETY_PROMPT, PTSTArgs
from spard.registry import build


def test_training_records_lose_system_turns_and_keep_the_rest():
    records = [chat("q1", "a1", source="t", kind="task", system="Be safe and refuse."),
               chat("q2", "a2", source="t", kind="harmful")]
    out = PTST(PTSTArgs()).prepare_data(records, ctx=None)  # type: ignore[arg-type]
    assert [r.messages for r in out] == [({"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}),
                                         ({"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"})]
    assert [r.kind for r in out] == ["task", "harmful"]
    own = PTST(PTSTArgs(train_system_prompt="You are a math tutor.")).prepare_data(records, ctx=None)
    assert all(r.messages[0] == {"role": "system", "content": "You are a math tutor."} for r in own)


def test_evaluation_gets_the_safety_prompt_unless_the_user_set_one():
    defense = build(load_config(None, ["defense.name=ptst"]).defense)
    assert defense.evaluation_args(EvalArgs()).system_prompt == PTST_SAFETY_PROMPT
    assert defense.evaluation_args(EvalArgs(system_prompt="mine")).system_prompt == "mine"
    msgs = with_system_prompt([{"role": "system", "content": "old"}, {"role": "user", "content": "hi"}], "new")
    assert msgs == [{"role": "system", "content": "new"}, {"role": "user", "content": "hi"}]


def test_ptst_run_evaluates_with_the_safety_prompt_and_records_it(tmp_path, tiny_tok):
    from spard import api
    from spard.testing import TINY_RUN_OVERRIDES, save_tiny_chat_model

    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", *TINY_RUN_OVERRIDES, "align.enabled=false",
                             "defense.name=ptst", f"train.output_dir={tmp_path / 'run'}"])
    result = api.run(cfg)
    after = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert after["config"]["system_prompt"] == PTST_SAFETY_PROMPT
    assert result.before.results["config"]["system_prompt"] == PTST_SAFETY_PROMPT  # both sides alike
    train_set = [Record.from_dict(json.loads(line)) for line in
                 (tmp_path / "run" / "train_set.jsonl").read_text().splitlines()]
    assert not any(m["role"] == "system" for r in train_set for m in r.messages)
