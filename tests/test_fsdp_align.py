"""The alignment stage under FSDP2 (and Vaccine under DDP): 2 CPU ranks (gloo) end with the model of one process.

Compared, per case (``tests/fsdp_align_worker.py``: align.method=sft with LoRA and with align.full_finetune,
under align.defense none, booster (LoRA and full), repnoise, vaccine (FSDP2 and DDP); align.method=dpo with LoRA
and full): the merged aligned model that rank 0 publishes (``model/model.safetensors``: whole tensors, not a
shard), the LoRA adapter (``run/final``), the per-step log (losses, gradient norm, each defense's statistics)
and the training metrics. The launch runs the HF Trainer's (and TRL's) real FSDP2 path with the settings of
``configs/accelerate/fsdp.yaml`` (``tests/fsdp_worker.py::allow_fsdp_on_cpu`` keeps accelerate from silently
running DDP on a CPU) and the test asserts that the model really was sharded before comparing.

Same data in both runs: 8 alignment examples, global batch 8 (4 per rank x 2 vs 8 x 1), so every step sees the
whole set whatever order the samplers pick; LoRA dropout 0; 3 steps (the first at learning rate 0, warmup).
Booster and RepNoise draw one harmful batch (2 pairs) that every rank shares.

Tolerance: atol 2e-5 on weights of magnitude ~0.2 (adapter) and ~1 (merged). Measured max differences: merged
models 1e-8 (LoRA) to 7e-7 (SFT full) and 2e-6 (DPO full), adapters 1e-7 to 8e-7. A missing all-reduce is far
outside it: with Booster's ‖∇h‖ or Vaccine's activation-gradient norm taken over each rank's part only, the
adapters differ by ~5e-2.

Also here: the launch's ranks align together while another process holds the cache entry (rank 0 waits for the
lock, the other rank for rank 0), then read it from the cache; Booster's shifted pass moves a tied head with its
embedding (found by this comparison: one process used to shift the embedding only); the plain copy rank 0
merges from. Takes ~70 s on 2 cores, under load (one single-process run of all cases, one 2-rank launch).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_fsdp import fsdp_env
from test_spard_ddp import free_port, run, worker_env

WORKER = Path(__file__).with_name("fsdp_align_worker.py")
CASES = ("none", "full", "booster", "booster_full", "repnoise", "vaccine", "vaccine_ddp", "dpo", "dpo_full")
ATOL = 2e-5


# ---------------------------------------------------------------------------------------------------------
# single-process pieces
# ---------------------------------------------------------------------------------------------------------
def test_booster_shifted_pass_moves_a_tied_head_with_its_embedding(tiny_tok):
    from spard.align_defenses.booster import normalised_step, shifted_harmful_gradients
    from spard.testing import tiny_model

    model = tiny_model(tiny_tok).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2's
    ids = torch.randint(4, len(tiny_tok), (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    g_harm, _, h0, h1 = shifted_harmful_gradients(model, batch, alpha=0.5)
    with torch.no_grad():  # θ − step in place: the head is the embedding, so it moves too (the reference's way)
        for p, s in zip([p for p in model.parameters() if p.requires_grad], normalised_step(g_harm, 0.5)):
            p.sub_(s)
        expected = float(model(**batch).loss)
    assert h1 == pytest.approx(expected, abs=1e-6) and abs(h1 - h0) > 1e-3


def test_plain_copy_holds_every_adapter_and_ties_the_head(tiny_tok):
    from spard.args import LoraArgs
    from spard.jobs.align import _plain_copy
    from spard.testing import tiny_model
    from spard.trainer import add_lora

    model = add_lora(tiny_model(tiny_tok), replace(LoraArgs(), r=4, dropout=0.0), seed=0)
    model.add_adapter("ref", model.peft_config["default"])  # as TRL's DPO reference adapter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    copy = _plain_copy(model, {k: v.clone() for k, v in model.state_dict().items()})
    assert sorted(copy.peft_config) == ["default", "ref"] and copy.active_adapter == "default"
    base = copy.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    ids = torch.randint(4, len(tiny_tok), (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(copy(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# DeepSpeed: refused (what was measured: README, "Several GPUs and several machines")
# ---------------------------------------------------------------------------------------------------------
def test_alignment_stage_refuses_deepspeed_before_any_work(tmp_path, tiny_tok, monkeypatch):
    from spard.config import load_config
    from spard.errors import ConfigError
    from spard.jobs.align import align

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch sets for DEEPSPEED configs
    cfg = load_config(None, [f"align.output_dir={tmp_path / 'aligned'}", "align.n_safety=2", "align.n_benign=2"])

    def no_model(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("loaded a model before refusing")

    monkeypatch.setattr("spard.jobs.align.load_model", no_model)
    with pytest.raises(ConfigError, match=r"alignment stage \(align.enabled\) does not support DeepSpeed.*FSDP2"):
        align(cfg)
    assert not (tmp_path / "aligned" / "model").exists()


# A Trainer whose accelerator really is in DeepSpeed mode (ZeRO-2 and ZeRO-3, one CPU process), handed to the
# defenses' setup: the refusal is spard.distributed.check_engine's, reached through the real trainer object.
DEEPSPEED_TRAINERS = """
import json, sys
from transformers import Trainer, TrainingArguments
from spard.defenses.safegrad import SafeGrad, SafeGradArgs
from spard.defenses.spard import Spard, SpardArgs
from spard.errors import ConfigError
from spard.testing import tiny_model, tiny_tokenizer

out = {}
for stage in (2, 3):
    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto"}
    trainer = Trainer(model=tiny_model(tiny_tokenizer()),
                      args=TrainingArguments(output_dir=sys.argv[1], report_to=[], deepspeed=config))
    spard = Spard(SpardArgs())
    spard._ctx, spard.task_records = object(), []
    row = {"engine": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]}
    for name, defense in (("spard", spard), ("safegrad", SafeGrad(SafeGradArgs()))):
        try:
            defense.setup(trainer)
            row[name] = None
        except ConfigError as e:
            row[name] = str(e)
    out[stage] = row
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (CI does "
                    "not install it)")
def test_real_deepspeed_trainers_are_refused_naming_fsdp2(tmp_path):
    env = dict(worker_env(tmp_path), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_TRAINERS, str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    for stage, row in rows.items():
        assert row["engine"] == "DEEPSPEED"
        for name in ("spard", "safegrad"):
            assert row[name] is not None and f"does not support DeepSpeed (ZeRO stage {stage})" in row[name]
            assert "configs/accelerate/fsdp.yaml" in row[name]


# ---------------------------------------------------------------------------------------------------------
# 2 ranks under FSDP2 (DDP for vaccine_ddp) vs one process
# ---------------------------------------------------------------------------------------------------------
def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> float:
    assert a.keys() == b.keys() and len(a) > 0, what
    for k in a:
        assert a[k].shape == b[k].shape, (what, k)  # whole tensors saved, not a rank's shard
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=f"{what}: {k}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _launch_while_locked(fsdp: Path, env: dict[str, str]) -> float:
    """Start the 2-rank launch while this process holds the first case's cache lock; release it once both ranks
    started (rank 0 then waits for the lock, the other rank for rank 0); returns the release time."""
    from spard.locking import dir_lock

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(WORKER), str(fsdp), "--fsdp", "--batch-size", "4", "--again", CASES[0]]
    with dir_lock(fsdp / CASES[0], what="aligned-model cache entry"):
        proc = subprocess.Popen(cmd, env=fsdp_env(env), cwd=WORKER.parents[1], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not all((fsdp / f"started-rank{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:]
            time.sleep(0.2)
        time.sleep(2.0)  # both ranks are in align() by now, waiting
        released = time.time()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{out[-2000:]}\n{err[-6000:]}"
    return released


@pytest.mark.multiprocess
def test_alignment_under_fsdp2_matches_single_process(tmp_path: Path, tiny_tok) -> None:
    from spard.testing import tiny_model

    env = worker_env(tmp_path)
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    run([sys.executable, str(WORKER), str(single), "--batch-size", "8"], env, timeout=300)
    released = _launch_while_locked(fsdp, env)
    base = tiny_model(tiny_tok).state_dict()

    for case in CASES:
        s = json.loads((single / case / "worker.json").read_text())
        d = json.loads((fsdp / case / "worker.json").read_text())
        assert s["world_size"] == 1 and d["world_size"] == 2 and not s["sharded"]
        if case.endswith("_ddp"):
            assert (d["engine"], d["wrapped"], d["sharded"]) == ("MULTI_CPU", "DistributedDataParallel", False)
        else:  # FSDP really ran: accelerate chose it, the model is an FSDP2 module, its trainable weights sharded
            assert (d["engine"], d["fsdp_module"], d["sharded"]) == ("FSDP", True, True), case
        ranks = [json.loads((fsdp / case / f"worker-rank{r}.json").read_text()) for r in (0, 1)]
        assert [(r["cached"], r["trained"]) for r in ranks] == [(False, True)] * 2, case
        assert ranks[0]["model_dir"] == ranks[1]["model_dir"] == str(fsdp / case / "model")

        assert len(s["log"]) == len(d["log"]) == (0 if "dpo" in case else 3)  # DPO logs through TRL only
        for a, b in zip(s["log"], d["log"]):
            assert a.keys() == b.keys()
            for key in a.keys() - {"epoch", "step"}:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (case, key)
        for key in ("steps", "first_loss", "last_loss", "train_loss"):
            assert s["metrics"][key] == pytest.approx(d["metrics"][key], rel=1e-5), (case, key)

        merged = load_file(single / case / "model" / "model.safetensors")
        _max_diff(merged, load_file(fsdp / case / "model" / "model.safetensors"), f"{case}: merged")
        assert max(float((merged[k] - base[k]).abs().max()) for k in merged) > 1e-3, case  # alignment moved it
        adapter = single / case / "run" / "final" / "adapter_model.safetensors"
        assert adapter.is_file() == ("full" not in case), case
        if adapter.is_file():
            theirs = load_file(fsdp / case / "run" / "final" / "adapter_model.safetensors")
            _max_diff(load_file(adapter), theirs, f"{case}: adapter")

    # the first case waited for the lock this test held; aligned once more, it comes from the cache on both ranks
    first = [json.loads((fsdp / CASES[0] / f"worker-rank{r}.json").read_text()) for r in (0, 1)]
    assert min(r["time"] for r in first) > released
    again = [json.loads((fsdp / CASES[0] / f"again-rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["cached"], r["trained"]) for r in again] == [(True, False)] * 2
