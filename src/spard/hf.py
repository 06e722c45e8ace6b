"""spard's defenses inside your own ``transformers.Trainer`` / ``trl.SFTTrainer`` training script.

    from spard.hf import DefenseCallback
    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, peft_config=LoraConfig(...),
                         callbacks=[DefenseCallback("spard", tau=0.2)])
    trainer.train()

:class:`DefenseCallback` runs any defense that acts through the step hooks of
:class:`spard.defenses.base.Defense` (SPARD, SafeGrad, and later ones); it is
:class:`spard.trainer.DefenseHookCallback` (the code spard's own trainer calls the hooks with) plus what
spard's fine-tuning job otherwise supplies: the defense's options, the user's prompts, the run directory,
the resume state. Defenses that only change the training data (SafeInstr) are :func:`augment_dataset`
instead: a callback cannot change the dataset a trainer has already built its dataloader from.

**How the callback finds the trainer.** transformers calls a callback with ``model``, ``processing_class``,
``optimizer``, ``lr_scheduler`` and the dataloaders, never with the trainer, but the defense hooks need
``trainer.args``, ``.model``, ``.processing_class``, ``.optimizer``, ``.accelerator`` and ``.state``. The
callback therefore finds it on the call stack: ``on_init_end`` (the end of ``Trainer.__init__``) and
``on_train_begin`` (inside ``Trainer.train``) are both called from a method of the trainer, so the nearest
frame whose ``self`` is a ``transformers.Trainer`` holding this callback is that trainer (subclasses such
as ``SFTTrainer`` included). When a custom loop calls the events some other way, call
``callback.attach(trainer)`` (or use :func:`add_defense`) before ``train()``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer

from spard.args import DataArgs, DefenseArgs, RunConfig, TrainArgs
from spard.config import build_dataclass
from spard.data.chat import IGNORE_INDEX
from spard.data.records import Record, chat
from spard.defenses.base import Defense, DefenseContext
from spard.errors import ConfigError, DataError
from spard.io import atomic_write_json, atomic_write_jsonl
from spard.registry import DEFENSES, build
from spard.rundir import (
    DEFENSE_STATE_FILE,
    checkpoint_problem,
    last_checkpoint,
    mark_complete,
    rotate_checkpoints,
    skipped_checkpoints,
)
from spard.trainer import DefenseHookCallback

__all__ = ["DefenseCallback", "add_defense", "augment_dataset", "defense_args", "dataset_prompts",
           "is_data_defense", "prompt_from_ids"]

log = logging.getLogger(__name__)

STEP_HOOKS = ("setup", "before_optimizer_step", "after_optimizer_step", "after_train")
"""The hooks a callback runs from the trainer's events."""
LOSS_HOOKS = ("training_batch", "loss")
"""The hooks that run inside ``compute_loss`` (Lisa's): no event reaches them, so for a defense that overrides
one the callback wraps the trainer's ``compute_loss`` as :class:`spard.trainer.SpardTrainer` does."""
SAFETY_DATA_FILE = "callback_safety_pool.jsonl"
"""Where a ``safety_data=`` list is written (in the run directory) for the defense to load as its pool."""


def defense_args(defense: str | DefenseArgs, options: Mapping[str, Any] | None = None,
                 label: str | None = None) -> DefenseArgs:
    """The options of ``defense`` (a registered name) as its own Args class, built and checked by the config
    loader: an unknown option, a wrong type or a bad value raises a :class:`ConfigError` naming it."""
    options = dict(options or {})
    if isinstance(defense, DefenseArgs):
        if options:
            defense = dataclasses.replace(defense, **options)
        return defense
    if not isinstance(defense, str) or not defense:
        raise ConfigError(f"defense must be a defense name such as 'spard', got {defense!r}")
    label = label or f"DefenseCallback({defense!r})"
    return build_dataclass(DefenseArgs, {"name": defense, **options}, label)


def _overrides(cls: type, hook: str) -> bool:
    return getattr(cls, hook) is not getattr(Defense, hook)


def is_data_defense(name: str) -> bool:
    """True for a defense that acts only by changing the training data (SafeInstr, PTST): it overrides
    ``prepare_data`` and none of the training hooks. Use :func:`augment_dataset` for it, not the callback."""
    cls = DEFENSES.get(name)
    return _overrides(cls, "prepare_data") and not any(_overrides(cls, h) for h in STEP_HOOKS + LOSS_HOOKS)


# ---------------------------------------------------------------------------------------------------------
# The user's prompts, from whatever the trainer's dataset holds
# ---------------------------------------------------------------------------------------------------------
def _first_user_turn(messages: Any, where: str) -> str:
    if isinstance(messages, str):
        return messages
    if isinstance(messages, Sequence):
        for m in messages:
            if isinstance(m, Mapping) and m.get("role") == "user" and isinstance(m.get("content"), str):
                return m["content"]
    raise DataError(f"{where}: no user turn (expected a list of {{'role', 'content'}} messages)")


def _find(ids: Sequence[int], pattern: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of ``pattern`` in ``ids`` at or after ``start``, or -1."""
    n = len(pattern)
    for i in range(start, len(ids) - n + 1):
        if list(ids[i:i + n]) == list(pattern):
            return i
    return -1


def _user_turn_markers(tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """Token ids the chat template puts before a user turn's content and right after it (found by rendering
    a one-turn conversation around a sentinel); None without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    sentinel = "SPARDSENTINELPROMPT"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                             add_generation_prompt=False)
    except Exception:  # a template that needs more than one turn: fall back to decoding everything
        return None
    head, found, tail = text.partition(sentinel)
    if not found:
        return None
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return encode(head), encode(tail)


def prompt_from_ids(input_ids: Sequence[int], tokenizer: Any, target_mask: Sequence[int] | None = None,
                    markers: tuple[list[int], list[int]] | None = None) -> str:
    """The first user turn of a tokenised chat example, decoded.

    Only the tokens before the first target (``target_mask`` true: a label that is not -100, a completion or
    assistant token) are read. The turn starts after the longest suffix of the template's user header found
    there (the whole header when the example has the template's default system prompt, ``<|im_start|>user``
    when it has another) and ends at the template's end-of-turn token. Decoding is only as faithful as the
    tokenizer: a lower-casing or normalising tokenizer returns the normalised text.
    """
    ids = list(input_ids)
    if target_mask is not None:
        first = next((i for i, t in enumerate(target_mask) if t), len(ids))
        ids = ids[:first]
    start, end = 0, len(ids)
    if markers is not None:
        head, tail = markers
        for n in range(len(head), min(2, len(head)) - 1, -1):  # at least 2 tokens: one token is too common
            pos = _find(ids, head[-n:]) if n else -1
            if pos >= 0:
                start = pos + n
                break
        if tail:
            stop = _find(ids, tail[:1], start)
            end = stop if stop >= 0 else end
    return tokenizer.decode(ids[start:end], skip_special_tokens=True).strip()


def _rows(dataset: Any) -> tuple[list[str], Any]:
    """Column names and a row accessor for a ``datasets.Dataset``, a list of dicts or a map-style torch dataset."""
    if dataset is None:
        raise ConfigError("DefenseCallback needs the trainer's train_dataset, or pass prompts=[...]")
    if hasattr(dataset, "column_names") and isinstance(dataset.column_names, list):
        return list(dataset.column_names), dataset
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ConfigError(f"DefenseCallback cannot read prompts from a {type(dataset).__name__} (an iterable "
                          "dataset has no length); pass prompts=[...]")
    if len(dataset) == 0:
        raise DataError("the train dataset is empty")
    first = dataset[0]
    if not isinstance(first, Mapping):
        raise ConfigError(f"DefenseCallback cannot read prompts from rows of type {type(first).__name__}; "
                          "pass prompts=[...]")
    return list(first), dataset


def _column(dataset: Any, name: str) -> list[Any]:
    if hasattr(dataset, "column_names"):
        return list(dataset[name])
    return [dataset[i][name] for i in range(len(dataset))]


def dataset_prompts(dataset: Any, tokenizer: Any = None) -> list[str]:
    """The user prompt of every example of a training dataset, from the first column it has of:

    ``messages`` (conversational: the first user turn), ``prompt`` (a string, or a list of messages), or
    ``input_ids`` (decoded with ``tokenizer`` by :func:`prompt_from_ids`; ``labels``, ``completion_mask``
    or ``assistant_masks`` mark the targets).
    """
    columns, rows = _rows(dataset)
    for name in ("messages", "prompt"):
        if name in columns:
            return [_first_user_turn(v, f"train dataset row {i}, column {name!r}")
                    for i, v in enumerate(_column(rows, name))]
    if "input_ids" in columns:
        if tokenizer is None:
            raise ConfigError("decoding the prompts of a tokenised dataset needs the tokenizer (processing_class)")
        markers = _user_turn_markers(tokenizer)
        masks: list[Any] = [None] * len(rows)
        if "labels" in columns:
            masks = [[t != IGNORE_INDEX for t in labels] for labels in _column(rows, "labels")]
        else:
            name = next((c for c in ("completion_mask", "assistant_masks") if c in columns), None)
            if name is not None:
                masks = _column(rows, name)
        return [prompt_from_ids(ids, tokenizer, mask, markers)
                for ids, mask in zip(_column(rows, "input_ids"), masks)]
    raise ConfigError(f"DefenseCallback: the train dataset has none of the columns 'messages', 'prompt', "
                      f"'input_ids' (it has {columns}); pass prompts=[...]")


def _safety_rows(safety_data: Iterable[Any]) -> list[dict[str, str]]:
    rows = []
    for i, item in enumerate(safety_data):
        if isinstance(item, Record):
            prompt, response = item.prompt, item.response
        elif isinstance(item, Mapping) and "messages" in item:
            msgs = item["messages"]
            prompt = _first_user_turn(msgs, f"safety_data[{i}]")
            response = next((m.get("content") for m in reversed(msgs) if m.get("role") == "assistant"), None)
        elif isinstance(item, Mapping):
            prompt, response = item.get("prompt"), item.get("response")
        else:
            prompt = response = None
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"safety_data[{i}]: need a harmful prompt and a safe reply ({{'prompt', 'response'}}, "
                            "{'messages'} or a Record)")
        rows.append({"prompt": prompt, "response": response})
    if not rows:
        raise DataError("safety_data is empty")
    return rows


# ---------------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------------
def _check_setup(trainer: Any, name: str) -> None:
    """Refuse engines whose gradients the hooks cannot read and rewrite in ``param.grad`` (DeepSpeed, FSDP1,
    Megatron, XLA), naming the engine; single process, DDP and FSDP2 are accepted."""
    from spard.distributed import check_engine

    check_engine(trainer, f"spard.hf.DefenseCallback({name!r})")


def _compute_loss_with_hooks(trainer: Trainer, defense: Defense) -> Any:
    """``trainer.compute_loss`` with the defense's ``training_batch`` and ``loss`` hooks around it, in the order
    :meth:`spard.trainer.SpardTrainer.compute_loss` calls them (the trainer's own method, TRL's included,
    still computes the loss)."""
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN202
        if model.training:
            inputs, num_items_in_batch = defense.training_batch(trainer, inputs, num_items_in_batch)
        loss, outputs = original(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = defense.loss(trainer, model, inputs, loss, outputs)
        return (loss, outputs) if return_outputs else loss

    compute_loss._spard_wrapped = True  # type: ignore[attr-defined]
    return compute_loss


def _train_from_whole_checkpoint(trainer: Trainer) -> Any:
    """``trainer.train`` whose ``resume_from_checkpoint=True`` takes the newest *whole* checkpoint
    (:func:`spard.rundir.last_checkpoint`) instead of HF's newest directory, saying which ones it skipped."""
    original = trainer.train

    def train(resume_from_checkpoint=None, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if resume_from_checkpoint is True:
            output_dir = Path(trainer.args.output_dir)
            for skipped, why in skipped_checkpoints(output_dir):
                log.warning("resume_from_checkpoint=True: skipping %s: not whole (%s)", skipped, why)
            ckpt = last_checkpoint(output_dir)
            if ckpt is None:
                raise ConfigError(f"resume_from_checkpoint=True: {output_dir} holds no whole checkpoint")
            log.info("resume_from_checkpoint=True: resuming from %s, the newest whole checkpoint", ckpt)
            resume_from_checkpoint = str(ckpt)
        # what the callback's on_train_begin reads the defense's state from (no call-stack lookup needed)
        trainer._spard_resumed_from = (Path(resume_from_checkpoint)  # type: ignore[attr-defined]
                                       if isinstance(resume_from_checkpoint, (str, Path)) else None)
        return original(resume_from_checkpoint, *args, **kwargs)

    train._spard_wrapped = True  # type: ignore[attr-defined]
    return train


def _resumed_checkpoint(trainer: Trainer, args: Any, step: int) -> Path:
    """The checkpoint ``trainer.train(resume_from_checkpoint=...)`` loaded: the argument as spard's wrapper of
    ``train`` recorded it; when ``train`` is not wrapped (the callback attached after it was called), the
    argument as the trainer's training loop holds it (found on the call stack, like the trainer itself); else
    ``output_dir/checkpoint-<step>``."""
    recorded = getattr(trainer, "_spard_resumed_from", None)
    if isinstance(recorded, Path):
        return recorded
    frame = inspect.currentframe()
    try:
        while frame is not None:
            value = frame.f_locals.get("resume_from_checkpoint")
            if frame.f_locals.get("self") is trainer and isinstance(value, (str, Path)):
                return Path(value)
            frame = frame.f_back
    finally:
        del frame
    return Path(args.output_dir) / f"checkpoint-{step}"


def _has_state(defense: Defense) -> bool:
    return _overrides(type(defense), "state_dict") or _overrides(type(defense), "save_tensors")


class DefenseCallback(DefenseHookCallback):
    """Run a spard defense inside any ``transformers.Trainer`` (``trl.SFTTrainer`` included).

    ``DefenseCallback("spard", tau=0.2)``: the defense ``name`` with its options (the fields of its Args
    class, e.g. :class:`spard.defenses.spard.SpardArgs`; checked like a config file). At ``on_train_begin``
    it takes the model, tokenizer, optimizer, seed and train dataset from the trainer, hands the user's
    prompts to the defense's data step, and sets it up; then it runs the step hooks, adds the defense's
    statistics to every training log (console, ``log_history``, wandb/tensorboard...), saves the defense's
    state in each checkpoint (and reads it back when ``train(resume_from_checkpoint=...)`` resumes), and
    calls ``after_train`` at ``on_train_end`` (before your own ``save_model``).

    Checkpoints are whole or ignored: ``on_save`` writes ``checkpoint-N/COMPLETE`` after the defense's state
    (:func:`spard.rundir.mark_complete`). ``train(resume_from_checkpoint=True)`` resumes from the newest whole
    checkpoint (not HF's newest directory); resuming from a checkpoint that is not whole, under a defense
    with state, raises a ``ConfigError`` before any step (pass ``spard.rundir.last_checkpoint(output_dir)``).
    While training, the callback applies ``save_total_limit`` itself, after the marker, so the rotation never
    deletes the last whole checkpoint before the next one is whole (``args.save_total_limit`` reads ``None``
    until ``on_train_end``).

    Args:
        defense: a registered defense name, or its Args instance.
        prompts: the user prompts SPARD's selection compares the safety pool to; default: read from the
            train dataset (:func:`dataset_prompts`).
        safety_data: harmful prompts with safe replies (``{"prompt", "response"}`` dicts, ``{"messages"}``
            dicts or Records) to use as the safety pool instead of spard's (``safety_source``).
        exclude_prompts: prompts the safety data must not contain (spard's own trainer passes the attack's).
        max_length: token limit per safety example; default ``args.max_length`` of a TRL config, else 384.
        run_dir: where the defense writes its files (SPARD's ``safety_subset.jsonl``, embedding cache);
            default ``args.output_dir``.
        seed: seed of the defense's sampling; default ``args.seed``.
        **options: the defense's options.
    """

    def __init__(self, defense: str | DefenseArgs = "spard", *, prompts: Sequence[str] | None = None,
                 safety_data: Iterable[Any] | None = None, exclude_prompts: Iterable[str] = (),
                 max_length: int | None = None, run_dir: str | Path | None = None, seed: int | None = None,
                 **options: Any) -> None:
        args = defense_args(defense, options)
        if is_data_defense(args.name):
            raise ConfigError(f"defense {args.name!r} only changes the training data: build your dataset with "
                              f"spard.hf.augment_dataset(dataset, {args.name!r}) and train on it without a callback")
        if safety_data is not None and not hasattr(args, "safety_source"):
            raise ConfigError(f"defense {args.name!r} uses no safety data; drop safety_data=")
        if max_length is not None and max_length < 8:
            raise ConfigError(f"max_length={max_length}: must be >= 8")
        super().__init__(None, build(args))  # type: ignore[arg-type]  # the trainer is found or attached later
        self.defense_args = args
        self.prompts = list(prompts) if prompts is not None else None
        self.safety_rows = _safety_rows(safety_data) if safety_data is not None else None
        self.exclude_prompts = list(exclude_prompts)
        self.max_length, self.run_dir, self.seed = max_length, run_dir, seed
        self._rotation: tuple[Any, int | None] | None = None
        """(the trainer's args, their save_total_limit) while the callback rotates checkpoints itself."""

    # -- finding the trainer ------------------------------------------------------------------------------
    def attach(self, trainer: Trainer) -> DefenseCallback:
        """Bind to ``trainer`` (adding this callback to it if needed) and go first among its callbacks, so
        reporting callbacks that run ``on_log`` see the defense's statistics."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            # Safe during an event too: CallbackHandler iterates the list by index, and removing the current
            # item and inserting it at 0 leaves every later item at its index.
            callbacks.remove(self)
        callbacks.insert(0, self)
        self.trainer = trainer
        cls = type(self.defense)
        if any(_overrides(cls, h) for h in LOSS_HOOKS) and not getattr(trainer.compute_loss, "_spard_wrapped", False):
            trainer.compute_loss = _compute_loss_with_hooks(trainer, self.defense)  # an instance attribute
        if callable(getattr(trainer, "train", None)) and not getattr(trainer.train, "_spard_wrapped", False):
            trainer.train = _train_from_whole_checkpoint(trainer)
        return self

    def _find_trainer(self) -> Trainer | None:
        frame = inspect.currentframe()
        try:
            while frame is not None:
                obj = frame.f_locals.get("self")
                handler = getattr(obj, "callback_handler", None)
                if isinstance(obj, Trainer) and handler is not None and self in handler.callbacks:
                    return obj
                frame = frame.f_back
            return None
        finally:
            del frame

    def on_init_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.trainer is None:
            trainer = self._find_trainer()
            if trainer is not None:
                self.attach(trainer)

    # -- the run -------------------------------------------------------------------------------------------
    def _context(self, trainer: Trainer) -> DefenseContext:
        targs = trainer.args
        max_length = self.max_length or getattr(targs, "max_length", None) or DataArgs().max_length
        seed = self.seed if self.seed is not None else targs.seed
        run_dir = Path(self.run_dir or targs.output_dir)
        config = RunConfig(data=DataArgs(max_length=int(max_length)), defense=self.defense.args,
                           train=TrainArgs(output_dir=str(run_dir), seed=seed))
        return DefenseContext(config=config, tokenizer=trainer.processing_class, run_dir=run_dir, seed=seed,
                              attack_prompts=self.exclude_prompts)

    def _use_safety_data(self, trainer: Trainer, run_dir: Path) -> None:
        path = run_dir / SAFETY_DATA_FILE
        with trainer.args.main_process_first(desc="spard safety data"):
            if trainer.is_world_process_zero():
                atomic_write_jsonl(path, self.safety_rows or [])
        self.defense.args = dataclasses.replace(self.defense.args, safety_source="local", safety_path=str(path))

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        trainer = self.trainer if self.trainer is not None and self in self.trainer.callback_handler.callbacks \
            else self._find_trainer()
        if trainer is None:
            raise RuntimeError("DefenseCallback could not find its Trainer on the call stack; call "
                               "callback.attach(trainer) (or spard.hf.add_defense) before trainer.train()")
        self.attach(trainer)
        _check_setup(trainer, self.defense_args.name)
        if trainer.processing_class is None:
            raise ConfigError("DefenseCallback needs the trainer's tokenizer: pass processing_class=tokenizer")
        if self.safety_rows is not None:
            self._use_safety_data(trainer, Path(self.run_dir or args.output_dir))
        ctx = self._context(trainer)
        prompts = self.prompts if self.prompts is not None else dataset_prompts(trainer.train_dataset,
                                                                                trainer.processing_class)
        records = [chat(p, None, source="train_dataset", kind="task") for p in prompts]
        if not records:
            raise DataError("DefenseCallback: no user prompts (empty train dataset or prompts=[])")
        kept = self.defense.prepare_data(records, ctx)
        if len(kept) != len(records) or any(a is not b for a, b in zip(kept, records)):
            raise ConfigError(f"defense {self.defense_args.name!r} changes the training data; use "
                              "spard.hf.augment_dataset instead of DefenseCallback")
        # train(resume_from_checkpoint=...) has restored global_step by now; read the defense state saved
        # in that checkpoint by on_save.
        self.resume_state = None
        if state.global_step > 0:
            ckpt = _resumed_checkpoint(trainer, args, state.global_step)
            problem = checkpoint_problem(ckpt) if ckpt.is_dir() else "no such directory"
            if problem is not None and _has_state(self.defense):
                newest = last_checkpoint(Path(args.output_dir))
                raise ConfigError(
                    f"DefenseCallback({self.defense_args.name!r}): resumed from {ckpt}, which is not a whole "
                    f"checkpoint ({problem}); the defense's state would silently start afresh. Resume with "
                    f"trainer.train(resume_from_checkpoint=spard.rundir.last_checkpoint(output_dir)) (here: "
                    f"{newest})")
            if problem is not None:
                log.warning("resumed from %s, which is not a whole checkpoint (%s)", ckpt, problem)
            elif (ckpt / DEFENSE_STATE_FILE).is_file():
                self.resume_state = json.loads((ckpt / DEFENSE_STATE_FILE).read_text())
        if self._rotation is None or self._rotation[0] is not args:
            self._rotation = (args, args.save_total_limit)
        args.save_total_limit = None  # applied by on_save, after the marker
        super().on_train_begin(args, state, control, **kwargs)
        if self.resume_state is not None:
            self.defense.load_tensors(_resumed_checkpoint(trainer, args, state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if not logs or "loss" not in logs:
            return
        stats = self.defense.log_stats()
        logs.update(stats)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(stats)  # Trainer.log appended its copy of ``logs`` before calling the callbacks

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.trainer is not None:
            self.trainer.accelerator.wait_for_everyone()  # every rank's files are in before rank 0 marks it
        if args.should_save:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            atomic_write_json(ckpt / DEFENSE_STATE_FILE, self.defense.state_dict())
            self.defense.save_tensors(ckpt)
            mark_complete(ckpt)
            limit = self._rotation[1] if self._rotation is not None else None
            best = state.best_model_checkpoint
            rotate_checkpoints(Path(args.output_dir), limit, protect=[Path(best)] if best else [])

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self._rotation is not None and self._rotation[0] is args:
            args.save_total_limit = self._rotation[1]
            self._rotation = None
        if self.trainer is not None:
            self.defense.after_train(self.trainer)


def add_defense(trainer: Trainer, defense: str | DefenseArgs = "spard", **kwargs: Any) -> DefenseCallback:
    """Add a :class:`DefenseCallback` to an existing trainer (bound explicitly, no stack lookup); returns it."""
    return DefenseCallback(defense, **kwargs).attach(trainer)


# ---------------------------------------------------------------------------------------------------------
# Defenses that change the data
# ---------------------------------------------------------------------------------------------------------
def _row_record(row: Mapping[str, Any], i: int) -> Record:
    where = f"dataset row {i}"
    try:
        if "messages" in row:
            return Record(messages=tuple(row["messages"]), source="dataset", kind="task")
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str):
            return chat(prompt, completion if isinstance(completion, str) else None, source="dataset", kind="task")
        if isinstance(prompt, Sequence):
            msgs = list(prompt) + (list(completion) if isinstance(completion, Sequence) else [])
            return Record(messages=tuple(msgs), source="dataset", kind="task")
    except (DataError, TypeError) as e:
        raise DataError(f"{where}: {e}") from None
    raise DataError(f"{where}: need a 'messages' column or 'prompt' (+ 'completion') columns")


def _new_row(record: Record, columns: list[str], template: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in columns}
    if "messages" in columns:
        row["messages"] = [dict(m) for m in record.messages]
    elif isinstance(template.get("prompt"), str):
        row["prompt"], row["completion"] = record.prompt, record.response
    else:
        user = [dict(m) for m in record.messages if m["role"] != "assistant"]
        row["prompt"] = user
        row["completion"] = [{"role": "assistant", "content": record.response}]
    return row


def augment_dataset(dataset: Any, defense: str | DefenseArgs = "safeinstr", *, seed: int = 0,
                    exclude_prompts: Iterable[str] = (), tokenizer: Any = None, run_dir: str | Path = ".",
                    **options: Any) -> Any:
    """The training set as a data-changing defense (SafeInstr) makes it, in the dataset's own format.

    ``dataset`` is a ``datasets.Dataset`` or a list of dicts with a ``messages`` column or ``prompt`` (+
    ``completion``) columns (TRL's conversational and prompt-completion formats). Rows the defense keeps are
    returned as they were; records it adds (SafeInstr's refusals) or rewrites (PTST's system prompt) become
    rows of the same format, with the other columns ``None``. The rows are ordered as the defense orders them
    (SafeInstr shuffles with ``seed``); returns the same type it was given.
    """
    args = defense_args(defense, options, label=f"augment_dataset(defense={getattr(defense, 'name', defense)!r})")
    columns, rows = _rows(dataset)
    originals = [dict(rows[i]) for i in range(len(rows))]
    records = [_row_record(r, i) for i, r in enumerate(originals)]
    where = {id(r): i for i, r in enumerate(records)}
    config = RunConfig(defense=args, train=TrainArgs(seed=seed))
    ctx = DefenseContext(config=config, tokenizer=tokenizer, run_dir=Path(run_dir), seed=seed,
                         attack_prompts=list(exclude_prompts))
    out = build(args).prepare_data(records, ctx)
    new_rows = [originals[where[id(r)]] if id(r) in where else _new_row(r, columns, originals[0]) for r in out]
    if hasattr(dataset, "column_names"):
        from datasets import Dataset

        return Dataset.from_list(new_rows)
    return new_rows
