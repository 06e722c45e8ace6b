"""FSDP2: whole-tensor reductions over shards, the engine checks, and 2 CPU ranks (gloo) under FSDP2 ending with
the adapter of one process.

The multi-process test runs the HF Trainer's real FSDP2 path (accelerate's ``fsdp2_prepare_model``, sharded
gradients, FSDP clipping) with the settings of ``configs/accelerate/fsdp.yaml``; on a CPU accelerate would
silently downgrade to DDP, which ``tests/fsdp_worker.py::allow_fsdp_on_cpu`` (a documented test-only patch)
prevents. It asserts that the model really was sharded (trainable parameters are DTensors, the model an
FSDPModule) before comparing. Same batches as tests/test_spard_ddp.py (4 examples, global batch 4; LoRA dropout
0). Tolerance: atol 2e-5 on adapter weights of magnitude ~0.06-0.2 after 3 steps; measured differences are
~2e-7 (halfspace), ~4e-6 (reference: Adam magnifies reordering noise) and ~7e-8 (safegrad). Without the loss
scaling by the rank count the FSDP average halves the safety gradient (norms 0.098 vs 0.197 at step 1); without
the shard-aware norms each rank would use its shard's norm: both far outside the tolerance.
Takes ~60 s on 2 cores (one single-process run, one 2-rank run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from spard.distributed import check_engine, combine_partials, per_tensor_dots, whole_dot
from spard.errors import ConfigError
from test_spard_ddp import free_port, run, worker_env

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_worker.py")
CASES = ("sft", "spard_halfspace", "spard_reference", "safegrad")


# ---------------------------------------------------------------------------------------------------------
# the pure reductions
# ---------------------------------------------------------------------------------------------------------
def test_combine_partials_sums_only_sharded_entries_over_ranks():
    # two ranks; tensor 0 is sharded (rank partial sums 1 and 2), tensor 1 replicated (each rank holds it: 5)
    partials = [torch.tensor([1.0, 5.0]), torch.tensor([2.0, 5.0])]
    handed = []  # what each rank hands to the collective
    for partial in partials:
        combine_partials(partial.clone(), [True, False], lambda t: handed.append(t.clone()))
    assert handed[0].tolist() == [1.0, 0.0]  # the replicated entry is kept out of the sum
    total = handed[0] + handed[1]
    outs = [combine_partials(p.clone(), [True, False], lambda t: t.copy_(total)) for p in partials]
    assert [o.tolist() for o in outs] == [[3.0, 5.0], [3.0, 5.0]]  # same whole values on both ranks
    calls = []
    assert combine_partials(torch.tensor([4.0]), [False], calls.append).tolist() == [4.0] and not calls


def test_per_tensor_dots_of_plain_tensors_need_no_process_group():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    b = [torch.tensor([3.0, -1.0]), torch.tensor([[2.0]])]
    assert per_tensor_dots(a, b).tolist() == [1.0, 6.0]
    assert float(whole_dot(a, b)) == 7.0
    with pytest.raises(ValueError, match="differ in length"):
        per_tensor_dots(a, b[:1])


# ---------------------------------------------------------------------------------------------------------
# engine checks: what is refused, and that FSDP2 is not
# ---------------------------------------------------------------------------------------------------------
def fake_trainer(dist, *, zero_stage=None, fsdp_version=None, **flags):
    state = SimpleNamespace(deepspeed_plugin=None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage),
                            fsdp_plugin=None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version))
    return SimpleNamespace(accelerator=SimpleNamespace(distributed_type=dist, state=state), **flags)


@pytest.mark.parametrize(("dist", "kwargs", "match"), [
    (DistributedType.DEEPSPEED, {"zero_stage": 3, "is_deepspeed_enabled": True},
     r"does not support DeepSpeed \(ZeRO stage 3\).*use FSDP2 \(accelerate launch --config_file "
     r"configs/accelerate/fsdp.yaml\)"),
    (DistributedType.FSDP, {"fsdp_version": 1, "is_fsdp_enabled": True}, "supports FSDP2 only, got fsdp_version=1"),
    (DistributedType.XLA, {}, "does not support distributed type XLA"),
])
def test_unsupported_engines_are_refused_naming_fsdp2(dist, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        check_engine(fake_trainer(dist, **kwargs), "defense.name=spard")


@pytest.mark.parametrize("dist", [DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU])
def test_single_process_ddp_and_fsdp2_are_accepted(dist):
    check_engine(fake_trainer(dist), "x")
    check_engine(fake_trainer(DistributedType.FSDP, fsdp_version=2, is_fsdp_enabled=True), "x")


def test_spard_setup_refuses_deepspeed_before_any_work():
    from spard.defenses.spard import Spard, SpardArgs

    defense = Spard(SpardArgs())
    defense._ctx, defense.task_records = object(), []  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="defense.name=spard does not support DeepSpeed"):
        defense.setup(fake_trainer(DistributedType.DEEPSPEED, zero_stage=2, is_deepspeed_enabled=True))


# ---------------------------------------------------------------------------------------------------------
# 2 ranks under FSDP2 vs one process
# ---------------------------------------------------------------------------------------------------------
def fsdp_env(base: dict[str, str]) -> dict[str, str]:
    """The environment ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` gives each process
    (``fsdp_x: v`` -> ``FSDP_X=v``, plus ``ACCELERATE_USE_FSDP``), so the test runs the shipped settings."""
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    env = dict(base, ACCELERATE_USE_FSDP="true")
    for key, value in config["fsdp_config"].items():
        env[key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


@pytest.mark.multiprocess
def test_fsdp2_matches_single_process(tmp_path: Path) -> None:
    env = worker_env(tmp_path)
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    run([sys.executable, str(WORKER), str(single), "--batch-size", "4", "--safety-batch-size", "2"], env, timeout=300)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(WORKER), str(fsdp), "--fsdp", "--batch-size", "2", "--safety-batch-size", "1"], fsdp_env(env),
        timeout=300)

    # the reductions themselves, on a fully_shard model with uneven shards and a replicated tensor mixed in
    red = json.loads((fsdp / "reductions.json").read_text())
    assert red["sharded"] == [True, True, True, False]
    for key in ("dots_err", "norm_err", "flat_dot_err", "projected_err", "scaled_err"):
        assert red[key] < 1e-5, (key, red)

    for case in CASES:
        s = json.loads((single / case / "worker.json").read_text())
        d = json.loads((fsdp / case / "worker.json").read_text())
        assert s["world_size"] == 1 and d["world_size"] == 2
        # FSDP really ran: accelerate chose it, the model is an FSDP2 module, the adapter is sharded
        assert (d["engine"], d["fsdp_module"], d["sharded"]) == ("FSDP", True, True), case
        assert not s["sharded"]
        for a, b in zip(s["log"], d["log"]):
            for key in ("loss", "safety_loss", "safety_grad_norm", "align_kl", "align_cosine"):
                if key in a:
                    assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (case, key)
        wa = load_file(single / case / "final" / "adapter_model.safetensors")
        wb = load_file(fsdp / case / "final" / "adapter_model.safetensors")
        assert wa.keys() == wb.keys() and len(wa) > 0
        for k in wa:
            assert wa[k].shape == wb[k].shape, k  # whole tensors saved, not a rank's shard
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=2e-5, msg=f"{case}: {k}")
        assert max(float(v.abs().max()) for k, v in wa.items() if "lora_B" in k) > 1e-3  # the runs moved it


@pytest.mark.parametrize("name", ["lisa", "safelora"])
def test_defenses_not_yet_shard_aware_refuse_fsdp_at_setup(name, monkeypatch):
    import spard.distributed
    from spard.defenses import get_defense

    cls = get_defense(name)
    defense = cls(cls.Args())
    model = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                              compute_loss=SimpleNamespace(_spard_wrapped=True))
    monkeypatch.setattr(spard.distributed, "any_sharded", lambda tensors: True)  # as under FSDP2
    with pytest.raises(ConfigError, match=f"defense.name='{name}' does not support FSDP yet"):
        defense.setup(trainer)
