"""The alignment stage: SFT of a base model on refusals mixed with benign data (or DPO on refusal-vs-harmful
pairs, ``align.method``; LoRA or every parameter, ``align.full_finetune``), merged into a new base.

``align.defense`` picks an alignment-stage defense (:mod:`spard.align_defenses`: Vaccine, Booster,
RepNoise) that trains through the same hooks as the fine-tuning defenses; ``none`` is plain SFT.

Papers on harmful fine-tuning start from "an aligned model"; the embedded SmolLM2-135M-Instruct does not
refuse harmful requests, so ``align`` makes it do so once, and caches the merged model (keyed by the base
model and the alignment options) so every later run starts from the same aligned weights.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spard.align_defenses.base import check_disjoint
from spard.args import AlignArgs, LoraArgs, ModelArgs, RunConfig, TrainArgs
from spard.defenses.base import DefenseContext
from spard.errors import ConfigError
from spard.evaluate.harm import load_harm_sets
from spard.evaluate.tasks.over_refusal import DEFAULT_BENIGN_SETS
from spard.io import atomic_write_json
from spard.jobs.align_data import alignment_records
from spard.jobs.align_dpo import BENIGN_PAIR_DATA, PAIR_DATA, harmful_pair_records, preference_pairs, train_dpo
from spard.locking import dir_lock
from spard.models import cache_dir, load_model, model_fingerprint, save_model
from spard.registry import ALIGN_DEFENSES, build
from spard.rundir import FINAL_DIR
from spard.trainer import fit

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass
class AlignResult:
    """Where the aligned model is and how its training went."""

    model_dir: Path
    """Merged aligned model (safetensors + tokenizer): use it as ``model.name_or_path``."""
    cached: bool
    """True when an earlier run had already built it."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Training metrics of the alignment run (loss start/end, steps, time)."""


ALIGN_LORA_DROPOUT = 0.05
"""The alignment adapter's LoRA dropout unless ``align.lora_dropout`` or the alignment defense says otherwise."""


def alignment_lora_dropout(align: AlignArgs) -> float:
    """``align.lora_dropout``, else the alignment defense's own default (Booster: 0), else 0.05."""
    if align.lora_dropout is not None:
        return float(align.lora_dropout)
    own = ALIGN_DEFENSES.get(align.defense.name).lora_dropout
    return ALIGN_LORA_DROPOUT if own is None else float(own)


def aligned_model_dir(model: ModelArgs, align: AlignArgs, train_bf16: str | bool = "auto") -> Path:
    """``align.output_dir``, else a cache directory keyed by the base model, the alignment options and a pinned
    precision (``train.bf16`` other than ``auto``: the alignment stage trains with the run's setting)."""
    if align.output_dir:
        return Path(align.output_dir)
    options = asdict(align)
    # a pinned precision enters the key (``auto`` keeps the keys of every model aligned before the alignment
    # stage followed train.bf16): a model aligned in bf16 is never reused by a run that pinned fp32
    if (precision := str(train_bf16).lower()) != "auto":
        options["bf16"] = precision
    # the dropout actually used enters the key, and only when it is not the 0.05 every model aligned before
    # this option existed was trained with (their keys, and so their cache entries, stay valid)
    options.pop("lora_dropout")
    if (dropout := alignment_lora_dropout(align)) != ALIGN_LORA_DROPOUT:
        options["lora_dropout"] = dropout
    # the benign data leaves out the packaged over-refusal prompts (since this key was introduced, so a model
    # aligned on an earlier, overlapping sample is never reused)
    options["benign_excludes"] = list(DEFAULT_BENIGN_SETS)
    # method, its data and full/LoRA enter the key only when they differ from what every earlier model was
    # aligned with (SFT, LoRA), so those models' keys (and cache entries) stay valid
    method, full, beta = options.pop("method"), options.pop("full_finetune"), options.pop("dpo_beta")
    if method != "sft":
        options.update(method=method, dpo_beta=beta, pairs=PAIR_DATA)
        if align.n_benign:
            options.update(benign_pairs=BENIGN_PAIR_DATA)
    if full:
        options.update(full_finetune=True, lora_r=None, lora_dropout=None)
    key = hashlib.sha256(json.dumps([model_fingerprint(model), options], sort_keys=True).encode()).hexdigest()
    return cache_dir() / "aligned" / key[:16]


def _cached(target: Path) -> AlignResult | None:
    model_dir = target / "model"
    if not (model_dir / "config.json").is_file():
        return None
    result_file = target / "align_result.json"
    info = json.loads(result_file.read_text()) if result_file.is_file() else {}
    log.info("using the cached aligned model %s", model_dir)
    return AlignResult(model_dir, cached=True, metrics=info.get("metrics", {}))


def align(cfg: RunConfig, *, model=None, tokenizer=None) -> AlignResult:  # noqa: ANN001
    """Align ``cfg.model`` (or return the cached aligned model).

    Safe under concurrent first use: processes that align the same model take the cache entry's lock
    (:func:`spard.locking.dir_lock`); the first trains and publishes it, the others wait and then read the
    published model. A crashed attempt (even ``kill -9``) leaves no model, and the next call starts it over.
    The ranks of one ``torchrun`` / ``accelerate launch`` (DDP, FSDP2) align together: see :func:`_align_launch`.
    """
    target = aligned_model_dir(cfg.model, cfg.align, cfg.train.bf16)
    if launch_world_size() > 1:
        return _align_launch(cfg, target, model, tokenizer)
    cached = _cached(target)
    if cached is not None:
        return cached
    target.mkdir(parents=True, exist_ok=True)
    with dir_lock(target, what="aligned-model cache entry", wait=True):
        cached = _cached(target)  # another process may have finished it while we waited
        if cached is not None:
            return cached
        _fresh_run_dir(target)
        return _build(cfg, target, model, tokenizer)


def launch_world_size() -> int:
    """The number of processes of this ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE``; 1 outside one), read
    before any process group exists."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


LAUNCH_WAIT = datetime.timedelta(days=7)
"""How long the ranks of a launch wait for its rank 0, which may wait for another process's alignment first."""


def _align_launch(cfg: RunConfig, target: Path, model, tokenizer) -> AlignResult:  # noqa: ANN001
    """The alignment stage for the ranks of one launch: rank 0 alone takes the cache entry's lock and decides for
    all (read the cached model, or train it); the decision is a collective, so every rank trains or none does.
    The ranks wait for rank 0 in a gloo group of their own with a long timeout (rank 0 may first wait for another
    process to finish the same model), not in the training group. Only rank 0 writes the run and the model;
    the others return once it is published. The cache must be on a filesystem every rank sees."""
    import torch.distributed as dist

    from spard.trainer import training_arguments

    # the process group the Trainer will use (its TrainingArguments create it; the Trainer's reuse it)
    training_arguments(_train_args(cfg, target / "run"), target / "run")
    waiting = dist.new_group(backend="gloo", timeout=LAUNCH_WAIT)
    rank = dist.get_rank()
    try:
        with contextlib.ExitStack() as stack:
            build = [False]
            if rank == 0:
                target.mkdir(parents=True, exist_ok=True)
                stack.enter_context(dir_lock(target, what="aligned-model cache entry", wait=True))
                build = [_cached(target) is None]
                if build[0]:
                    _fresh_run_dir(target)
            dist.broadcast_object_list(build, src=0, group=waiting)
            result = _build(cfg, target, model, tokenizer) if build[0] else None
            dist.barrier(group=waiting)  # rank 0 has published the model
        cached = _cached(target)
        if cached is None:
            raise ConfigError(f"rank {rank} cannot see the aligned model rank 0 published in {target}: the spard "
                              "cache (SPARD_CACHE) or align.output_dir must be on a filesystem every node shares")
        return result if result is not None else cached
    finally:
        dist.destroy_process_group(waiting)


def _fresh_run_dir(target: Path) -> Path:
    run_dir = target / "run"
    if run_dir.exists():  # a crashed earlier attempt: start it over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _train_args(cfg: RunConfig, run_dir: Path) -> TrainArgs:
    a = cfg.align
    return TrainArgs(output_dir=str(run_dir), epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                     save_steps=10_000, lr_scheduler="cosine", warmup_ratio=0.05,
                     gradient_checkpointing=cfg.train.gradient_checkpointing, bf16=cfg.train.bf16)


def _build(cfg: RunConfig, target: Path, model, tokenizer) -> AlignResult:  # noqa: ANN001
    """Train the aligned model into ``target`` (``target/run`` prepared); under a launch every rank calls it and
    only rank 0 writes."""
    from spard.distributed import world

    a = cfg.align
    check_alignment_engine()
    check_alignment_data_disjoint(cfg, [])  # the harm sets; the attack is checked when fine-tuning
    if model is None or tokenizer is None:
        model, tokenizer = load_model(cfg.model)
    run_dir = target / "run"
    train_args = _train_args(cfg, run_dir)
    lora = None if a.full_finetune else replace(LoraArgs(), r=a.lora_r, alpha=2 * a.lora_r,
                                                dropout=alignment_lora_dropout(a),
                                                target_modules=cfg.lora.target_modules)
    if a.method == "dpo":
        pairs = preference_pairs(a)
        log.info("align: DPO on %d preference pairs (%s)", len(pairs), "full" if lora is None else "LoRA")
        trained, metrics = train_dpo(model, tokenizer, pairs, lora=lora, args=train_args, beta=a.dpo_beta,
                                     max_length=a.max_length, run_dir=run_dir)
    else:
        trained, metrics = _train_sft(cfg, model, tokenizer, lora, train_args, run_dir)
    whole = whole_model_on_rank0(trained)  # collective under FSDP2
    if world()[0] == 0:
        assert whole is not None
        merged = whole.merge_and_unload() if lora is not None else whole
        merged.config.name_or_path = f"{cfg.model.name_or_path} (aligned by spard)"
        # the model's atomic rename publishes the entry, so it comes last: a cached model always has its record
        adapter = str(run_dir / FINAL_DIR) if lora is not None else None
        atomic_write_json(target / "align_result.json", {"base_model": cfg.model.name_or_path, "align": asdict(a),
                                                         "metrics": metrics, "adapter": adapter})
        save_model(merged, tokenizer, target / "model")
    return AlignResult(target / "model", cached=False, metrics=metrics)


def check_alignment_engine() -> None:
    """Refuse to train the aligned model under DeepSpeed (``accelerate launch`` with ``distributed_type:
    DEEPSPEED`` sets ``ACCELERATE_USE_DEEPSPEED``), before any work. Measured on 2 CPU ranks: under ZeRO-3 the
    stage published a merged model built from DeepSpeed's partitioned placeholders (an empty embedding matrix)
    without any error, and Vaccine failed inside ZeRO-2's gradient reduction. A cached aligned model is still
    read under DeepSpeed (nothing is trained)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":  # accelerate's own test
        raise ConfigError("the alignment stage (align.enabled) does not support DeepSpeed: under ZeRO-3 its merged "
                          "model would be built from partitioned weights. Use FSDP2 (accelerate launch "
                          "--config_file configs/accelerate/fsdp.yaml) or DDP, or align once without DeepSpeed "
                          "(the aligned model is cached; later runs only read it)")


def whole_model_on_rank0(model: PreTrainedModel) -> PreTrainedModel | None:
    """``model`` (a trained model or ``PeftModel``) with whole weights on rank 0, None on the other ranks.

    Under FSDP2 each rank holds a shard of every weight and the modules are FSDP classes: the full state dict is
    gathered to rank 0's CPU (collective: call on every rank) and loaded into a plain copy of the architecture
    (built without allocating weights), so rank 0 alone ever holds the whole model. Otherwise (one process, DDP)
    rank 0's model is already whole."""
    from spard.distributed import any_sharded, world

    rank = world()[0]
    if not any_sharded(list(model.parameters())):
        return model if rank == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    return _plain_copy(model, state)


def _plain_class(module: torch.nn.Module) -> type:
    """The class ``module`` had before FSDP2's ``fully_shard`` swapped it for an ``FSDP<cls>`` subclass."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _plain_copy(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """An unsharded module of ``model``'s architecture (base model class, LoRA adapter if any) holding ``state``."""
    from accelerate import init_empty_weights
    from peft import PeftModel, get_peft_model

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) real
        plain = _plain_class(base)(base.config)
    if isinstance(model, PeftModel):  # every adapter (TRL's frozen "ref" too), the trained one active
        active = model.active_adapter
        plain = get_peft_model(plain, copy.deepcopy(model.peft_config[active]), adapter_name=active)
        for name, config in model.peft_config.items():
            if name != active:
                plain.add_adapter(name, copy.deepcopy(config))
        plain.set_adapter(active)
    plain.load_state_dict(state, strict=True, assign=True)
    (plain.get_base_model() if isinstance(plain, PeftModel) else plain).tie_weights()
    return plain.eval()


def _train_sft(cfg: RunConfig, model, tokenizer, lora: LoraArgs | None, train_args: TrainArgs,  # noqa: ANN001
               run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """``align.method: sft``: refusals + benign answers through :func:`spard.trainer.fit`, under the alignment
    defense."""
    a = cfg.align
    defense = build(a.defense)
    log.info("align: %d refusals + %d benign examples, alignment defense %r, %s", a.n_safety, a.n_benign,
             defense.name, "full" if lora is None else "LoRA")
    ctx = DefenseContext(config=cfg, tokenizer=tokenizer, run_dir=run_dir, seed=a.seed)
    records = defense.prepare_data(alignment_records(a), ctx)
    # a full fine-tune is published whole as target/model: no second copy of every weight in run/final
    return fit(model, tokenizer, records, lora=lora, args=train_args, max_length=a.max_length, defense=defense,
               run_dir=run_dir, save_final=lora is not None)


def check_alignment_data_disjoint(cfg: RunConfig, attack_prompts: list[str]) -> None:
    """Refuse a run whose attack prompts or harm-set prompts include a prompt of the harmful pairs its
    alignment defense (Booster, RepNoise) or DPO trained against; a no-op without harmful alignment data."""
    if not cfg.align.enabled:
        return
    for harmful, data in ((build(cfg.align.defense).harmful_records(cfg.align), None),
                          (harmful_pair_records(cfg.align), "the DPO pairs' harmful answers (align.method=dpo)")):
        if not harmful:
            continue
        check_disjoint(harmful, attack_prompts, "this run's attack data", data=data)
        check_disjoint(harmful, [r.prompt for r in load_harm_sets(cfg.eval)], f"the harm sets {cfg.eval.harm_sets}",
                       data=data)


def base_for_finetuning(cfg: RunConfig) -> tuple[ModelArgs, str]:
    """The model fine-tuning starts from: the aligned model when ``align.enabled``, else ``cfg.model``."""
    if not cfg.align.enabled:
        return cfg.model, cfg.model.name_or_path
    result = align(cfg)
    return replace(cfg.model, name_or_path=str(result.model_dir)), str(result.model_dir)
