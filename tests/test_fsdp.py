"""FSDP2: whole-tensor reductions over shards, the engine checks, and 2 CPU ranks (gloo) under FSDP2 ending with
the adapter of one process, for every fine-tuning defense, across a resume, and in a user's own Trainer.

The multi-process tests run the HF Trainer's real FSDP2 path (accelerate's ``fsdp2_prepare_model``, sharded
gradients, FSDP clipping, ``SHARDED_STATE_DICT`` checkpoints through DCP) with the settings of
``configs/accelerate/fsdp.yaml``; on a CPU accelerate would silently downgrade to DDP, which
``tests/fsdp_worker.py::allow_fsdp_on_cpu`` (a documented test-only patch) prevents. Each FSDP run asserts that
the model really was sharded (trainable parameters are DTensors, the model an FSDPModule) before comparing. Same
batches as tests/test_spard_ddp.py (4 examples, global batch 4 = 2 per rank x 2 vs 4 x 1; LoRA dropout 0).

What is compared, one launch per side (tests/fsdp_worker.py): for sft, spard (both rules), safegrad, safeinstr,
ptst, lisa and safelora, the final adapter after 3 steps and the logged losses and defense statistics (SafeLoRA
also its unprojected adapter and per-module cosines); for spard (reference rule), safegrad and lisa, a 4-step run
with a checkpoint at step 2, and under FSDP the same run cut after checkpoint-2 (a copy of the run directory as it
was then) and resumed; and ``DefenseCallback("spard")`` in a plain ``transformers.Trainer``.

Tolerance: atol 2e-5 against one process on adapter weights of magnitude ~0.06-0.2. Measured max differences:
sft 8e-8, spard halfspace 3e-7, spard reference 4e-6 (Adam magnifies reordering noise), safegrad 2e-7, safeinstr
9e-8, ptst 8e-8, lisa 3e-7, safelora 4e-8, DefenseCallback 2e-6; Lisa's checkpointed anchor 6e-9. A resume under
FSDP equals the uninterrupted FSDP run exactly (atol 0) and one process to 4e-6 (spard), 2e-7 (safegrad), 4e-7
(lisa). What fails otherwise (measured): without the loss scaling by the rank count the FSDP average halves the
safety gradient (norms 0.098 vs 0.197 at step 1); without the shard-aware norms each rank would use its shard's;
Lisa's proximal value without the all-reduce is half (0.098 vs 0.195; the gradient reaches each shard directly and
is right either way, hence the logs are compared); a resume that drops the anchor ends 6e-2 away; SafeLoRA writing
no shard of the projected B ends 6e-2 away: all far outside the tolerance.
Takes ~75-95 s on 2 shared cores (one single-process launch ~25 s, one 2-rank launch ~65 s).
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

from fsdp_worker import CASES, RESUME_SAVE, RESUME_STEPS
from spard.defenses.lisa import ANCHOR_FILE
from spard.defenses.safelora import PROJECTION_FILE, UNPROJECTED_DIR
from spard.distributed import check_engine, combine_partials, per_tensor_dots, whole_dot, whole_sums
from spard.errors import ConfigError
from spard.rundir import DEFENSE_STATE_FILE, checkpoint_problem
from test_spard_ddp import free_port, run, worker_env

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_worker.py")
RESUME_CASES = ("spard_reference", "safegrad", "lisa")
"""Defenses with state across steps, checkpointed under FSDP and resumed."""


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


def test_whole_sums_of_plain_tensors_are_the_partials_with_their_gradient():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    partials = torch.stack([(x * x).sum(), x.sum()])
    out = whole_sums(partials, [x, x])
    assert out.tolist() == [5.0, 3.0]
    out.sum().backward()
    assert x.grad.tolist() == [3.0, 5.0]  # d/dx (x·x + Σx) = 2x + 1


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


@pytest.mark.parametrize("name", ["spard", "safegrad", "lisa", "safelora"])
def test_defenses_refuse_deepspeed_and_fsdp1_at_setup_before_any_work(name):
    from spard.defenses import get_defense

    cls = get_defense(name)
    defense = cls(cls.Args())
    if name == "spard":
        defense._ctx, defense.task_records = object(), []  # type: ignore[attr-defined]
    trainer = fake_trainer(DistributedType.DEEPSPEED, zero_stage=3, is_deepspeed_enabled=True)
    with pytest.raises(ConfigError, match=rf"defense.name='?{name}'? does not support DeepSpeed \(ZeRO stage 3\)"):
        defense.setup(trainer)
    with pytest.raises(ConfigError, match="supports FSDP2 only, got fsdp_version=1"):
        defense.setup(fake_trainer(DistributedType.FSDP, fsdp_version=1, is_fsdp_enabled=True))


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


def adapter_max_diff(a: Path, b: Path, atol: float = 2e-5) -> float:
    """Largest difference between two saved adapters (same keys and whole shapes asserted), checked against atol."""
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys() and len(wa) > 0, (a, b)
    for k in wa:
        assert wa[k].shape == wb[k].shape, k  # whole tensors saved, not a rank's shard
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=f"{a} vs {b}: {k}")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def same_logs(a: dict, b: dict, what: str) -> None:
    """The logged losses and defense statistics of two runs agree step by step."""
    assert [r["step"] for r in a["log"]] == [r["step"] for r in b["log"]], what
    for ra, rb in zip(a["log"], b["log"]):
        for key in ("loss", "safety_loss", "safety_grad_norm", "align_kl", "align_cosine", "lisa_prox",
                    "lisa_drift"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (what, ra["step"], key)


def same_state(a: object, b: object, where: str) -> None:
    """Two defense states (JSON) agree: the same keys and strings, numbers to rel 1e-4."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (int, float)) and not isinstance(a, bool):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6, nan_ok=True), where
    else:
        assert a == b, where


def assert_fsdp_ran(report: dict, what: str) -> None:
    """accelerate chose FSDP, the model is an FSDP2 module and the adapter is sharded (else nothing is tested)."""
    assert report["world_size"] == 2, what
    assert (report["engine"], report["fsdp_module"], report["sharded"]) == ("FSDP", True, True), what


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One single-process launch and one 2-rank FSDP2 launch of every run (the cases, the checkpointed runs (cut and
    resumed under FSDP), DefenseCallback in a plain Trainer)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    env = worker_env(tmp)
    single, fsdp = tmp / "single", tmp / "fsdp"
    common = ["--cases", ",".join(CASES), "--resume-cases", ",".join(RESUME_CASES), "--hf"]
    run([sys.executable, str(WORKER), str(single), "--batch-size", "4", "--safety-batch-size", "2", *common], env,
        timeout=400)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(WORKER), str(fsdp), "--fsdp", "--batch-size", "2", "--safety-batch-size", "1", "--interrupt", *common],
        fsdp_env(env), timeout=400)
    return single, fsdp


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "worker.json").read_text())


@pytest.mark.multiprocess
def test_fsdp2_matches_single_process(runs: tuple[Path, Path]) -> None:
    single, fsdp = runs
    # the reductions themselves, on a fully_shard model with uneven shards and a replicated tensor mixed in
    red = json.loads((fsdp / "reductions.json").read_text())
    assert red["sharded"] == [True, True, True, False]
    for key in ("dots_err", "norm_err", "flat_dot_err", "projected_err", "scaled_err", "shard_like_err",
                "prox_err", "prox_grad_err"):
        assert red[key] < 1e-5, (key, red)

    for case in CASES:
        s, d = report(single / case), report(fsdp / case)
        assert s["world_size"] == 1 and not s["sharded"]
        assert_fsdp_ran(d, case)
        same_logs(s, d, case)
        adapter_max_diff(single / case / "final" / "adapter_model.safetensors",
                         fsdp / case / "final" / "adapter_model.safetensors")
        wa = load_file(single / case / "final" / "adapter_model.safetensors")
        assert max(float(v.abs().max()) for k, v in wa.items() if "lora_B" in k) > 1e-3  # the runs moved it

    # SafeLoRA: the same modules projected with the same cosines, the unprojected adapter saved whole too
    sides = [json.loads((root / "safelora" / UNPROJECTED_DIR / PROJECTION_FILE).read_text()) for root in runs]
    assert [m["module"] for m in sides[0]["modules"]] == [m["module"] for m in sides[1]["modules"]]
    assert [m["projected"] for m in sides[0]["modules"]] == [m["projected"] for m in sides[1]["modules"]]
    assert sum(m["projected"] for m in sides[0]["modules"]) == 3
    for a, b in zip(sides[0]["modules"], sides[1]["modules"]):
        assert a["similarity"] == pytest.approx(b["similarity"], abs=2e-5)
    adapter_max_diff(single / "safelora" / UNPROJECTED_DIR / "adapter_model.safetensors",
                     fsdp / "safelora" / UNPROJECTED_DIR / "adapter_model.safetensors")
    projected = load_file(fsdp / "safelora" / "final" / "adapter_model.safetensors")
    trained = load_file(fsdp / "safelora" / UNPROJECTED_DIR / "adapter_model.safetensors")
    assert sum(not torch.equal(projected[k], trained[k]) for k in projected) == 3  # 3 B matrices rewritten


@pytest.mark.multiprocess
def test_fsdp2_resume_matches_the_uninterrupted_run(runs: tuple[Path, Path]) -> None:
    single, fsdp = runs
    for case in RESUME_CASES:
        straight, resumed = fsdp / f"{case}-straight", fsdp / f"{case}-resumed"
        s, a, b = report(single / f"{case}-straight"), report(straight), report(resumed)
        for what, rep in ((f"{case} straight", a), (f"{case} resumed", b)):
            assert_fsdp_ran(rep, what)
        assert (a["start_step"], b["start_step"]) == (0, RESUME_SAVE), case  # the cut run did resume
        ckpt = f"checkpoint-{RESUME_SAVE}"
        # the checkpoint under FSDP: the model and optimizer as sharded (DCP) state, the defense state whole, the
        # same as one process wrote
        assert (straight / ckpt / "pytorch_model_fsdp_0").is_dir() and (straight / ckpt / "optimizer_0").is_dir()
        assert checkpoint_problem(straight / ckpt) is None
        assert checkpoint_problem(resumed / f"checkpoint-{RESUME_STEPS}") is None
        same_state(json.loads((straight / ckpt / DEFENSE_STATE_FILE).read_text()),
                   json.loads((single / f"{case}-straight" / ckpt / DEFENSE_STATE_FILE).read_text()), case)
        final = "final/adapter_model.safetensors"
        # resumed under FSDP = uninterrupted under FSDP (bit for bit), and = one process
        assert adapter_max_diff(straight / final, resumed / final, atol=0.0) == 0.0, case
        adapter_max_diff(single / f"{case}-straight" / final, resumed / final)
        same_logs(a, b, f"{case} resumed")
        same_logs(s, b, f"{case} resumed vs one process")
    # SPARD's selection, redone at setup from the base model (adapter off): the same subset on resume, as one process
    subset = (single / "spard_reference-straight" / "safety_subset.jsonl").read_text()
    for run_dir in ("spard_reference-straight", "spard_reference-resumed"):
        assert (fsdp / run_dir / "safety_subset.jsonl").read_text() == subset, run_dir
    # Lisa's anchor is saved whole (gathered from the shards): the file one process writes, so either resumes it
    anchor = f"checkpoint-{RESUME_SAVE}/{ANCHOR_FILE}"
    adapter_max_diff(single / "lisa-straight" / anchor, fsdp / "lisa-straight" / anchor)


@pytest.mark.multiprocess
def test_defense_callback_in_a_plain_trainer_under_fsdp2_matches_single_process(runs: tuple[Path, Path]) -> None:
    single, fsdp = runs
    s, d = report(single / "hf_spard"), report(fsdp / "hf_spard")
    assert_fsdp_ran(d, "hf_spard")
    assert [r["safety_projections"] for r in d["log"]] == [1, 2, 3]  # the defense acted at every step
    same_logs(s, d, "hf_spard")
    adapter_max_diff(single / "hf_spard" / "final" / "adapter_model.safetensors",
                     fsdp / "hf_spard" / "final" / "adapter_model.safetensors")


def test_collectives_move_cpu_tensors_to_the_gpu_only_for_nccl():
    from spard.distributed import collective_device

    cpu = torch.device("cpu")
    assert collective_device("gloo", cpu) == cpu
    assert collective_device("gloo", torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert collective_device("nccl", torch.device("cuda", 3)) == torch.device("cuda", 3)
    if torch.cuda.is_available():
        assert collective_device("nccl", cpu) == torch.device("cuda", torch.cuda.current_device())
    else:  # NCCL needs a GPU: asking for one without it fails loudly, never reduces on the CPU
        with pytest.raises((RuntimeError, AssertionError)):
            collective_device("nccl", cpu)
