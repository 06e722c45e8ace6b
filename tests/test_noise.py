"""What a user sees on the console: no raw HF log dicts on stdout, no known-harmless warnings, report_to."""

from __future__ import annotations

import logging
import subprocess
import sys

from transformers.trainer_callback import ProgressCallback, TrainerControl, TrainerState

from spard.args import LoraArgs, TrainArgs
from spard.trainer import LoggingProgressCallback, SpardTrainer, add_lora, training_arguments


def test_step_logs_go_to_the_logger_not_stdout(capsys, caplog):
    state = TrainerState()
    state.global_step = 3
    args = training_arguments(TrainArgs(output_dir="unused"), "unused")
    with caplog.at_level(logging.INFO, logger="spard.trainer"):
        LoggingProgressCallback().on_log(args, state, TrainerControl(), logs={"loss": 1.23456, "epoch": 0.5})
    # HF's ProgressCallback prints the dict ("{'loss': '1.235', ...}") on stdout
    assert capsys.readouterr().out == ""
    assert "step 3: loss 1.235, epoch 0.5" in caplog.text


def test_spard_trainer_replaces_the_printing_progress_callback(tiny_llm, tiny_tok, tmp_path):
    from spard.defenses.sft import SFT

    model = add_lora(tiny_llm, LoraArgs(r=2, alpha=4), 0)
    trainer = SpardTrainer(model=model, args=training_arguments(TrainArgs(output_dir=str(tmp_path)), tmp_path),
                           train_dataset=[], processing_class=tiny_tok, defense=SFT(SFT.Args()))
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert LoggingProgressCallback in kinds and ProgressCallback not in kinds


def test_the_gradient_checkpointing_future_warning_is_silenced():
    # a fresh interpreter: pytest installs its own warning filters around each test
    code = ("import warnings, spard.trainer\n"
            "warnings.warn('`model.is_gradient_checkpointing` is deprecated', FutureWarning)\n"
            "warnings.warn('something else', FutureWarning)\n")
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=True)
    assert "something else" in out.stderr and "is_gradient_checkpointing" not in out.stderr


def test_report_to_passes_through(tmp_path):
    assert training_arguments(TrainArgs(output_dir=str(tmp_path)), tmp_path).report_to in ([], ["none"], "none")
    args = training_arguments(TrainArgs(output_dir=str(tmp_path), report_to=["tensorboard"]), tmp_path)
    assert args.report_to == ["tensorboard"]
