"""Ship a fine-tuned model: a finished run's LoRA adapter, or the merged model, with tokenizer and chat template.

    spard export runs/sft out/sft-adapter               # adapter_model.safetensors + tokenizer
    spard export runs/sft out/sft-merged --merged       # model.safetensors + tokenizer: a plain model
    spard export runs/sft out/sft-merged --merged --push-to-hub me/sft-merged

Both load with ``AutoModelForCausalLM.from_pretrained(out_dir)`` (an adapter through transformers' PEFT
integration, which loads the base named in ``adapter_config.json``). The adapter is the run's ``final/``: what
the run saved after the defense's ``after_train`` hook, so a defense that changes the weights after training
(SafeLoRA) exports its defended adapter. The base is the model the run fine-tuned (the aligned model when the
run aligned one). The output directory is written whole or not at all (a temp directory renamed at the end).
This module is callable: ``spard.export(...)`` is :func:`spard.api.export` whether or not it was imported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from spard import CallablePackage
from spard.errors import SpardError
from spard.hub import is_hub_id
from spard.rundir import CONFIG_FILE, FINAL_DIR, TRAIN_RESULT_FILE
from spard.untrusted import require_safetensors

__all__ = ["ExportResult", "export_run", "check_push_to_hub", "EXPORT_INFO_FILE"]

log = logging.getLogger(__name__)

EXPORT_INFO_FILE = "spard_export.json"
"""Written into the exported directory: which run, base model, defense, and whether merged."""
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class ExportResult:
    """What :func:`export_run` wrote."""

    out_dir: Path
    """The exported model directory."""
    merged: bool
    """A merged model (True) or the LoRA adapter (False)."""
    base_model: str
    """The model the adapter applies to (the run's base: a hub id, or a local directory)."""
    hub_url: str | None = None
    """The hub repo it was pushed to, if any."""

    def summary(self) -> str:
        what = "merged model" if self.merged else f"LoRA adapter (base: {self.base_model})"
        lines = [f"exported {what} to {self.out_dir}"]
        if not self.merged and not is_hub_id(self.base_model):
            lines.append("note: the base is a local directory; ship it with the adapter, or export --merged")
        if self.hub_url:
            lines.append(f"pushed to {self.hub_url}")
        return "\n".join(lines)


def check_push_to_hub(repo: str) -> str:
    """Before any work: ``huggingface_hub`` is installed, not offline, a token exists and the hub answers.
    Returns the token; otherwise a SpardError that says which of these is missing."""
    try:
        import huggingface_hub
    except ImportError:
        raise SpardError("--push-to-hub needs the huggingface_hub package: pip install huggingface_hub") from None
    if not is_hub_id(repo):
        raise SpardError(f"--push-to-hub {repo!r}: not a hub repo id (owner/name)")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise SpardError("--push-to-hub: HF_HUB_OFFLINE is set; unset it on a machine with network access")
    token = huggingface_hub.get_token()
    if not token:
        raise SpardError("--push-to-hub: no Hugging Face token; set HF_TOKEN or run `huggingface-cli login`")
    try:
        huggingface_hub.whoami(token=token)
    except Exception as e:  # connection error, bad token: say so before exporting anything
        raise SpardError(f"--push-to-hub: the hub did not accept the token or cannot be reached ({e})") from None
    return token


def _finished_run(run_dir: Path) -> tuple[str, object]:
    from spard.config import load_config

    missing = [f for f in (CONFIG_FILE, TRAIN_RESULT_FILE) if not (run_dir / f).is_file()]
    missing += [f"{FINAL_DIR}/{f}" for f in ADAPTER_FILES if not (run_dir / FINAL_DIR / f).is_file()]
    if missing:
        raise SpardError(f"{run_dir}: not a finished spard run ({', '.join(missing)} missing)")
    base = json.loads((run_dir / TRAIN_RESULT_FILE).read_text())["base_model"]
    return base, load_config(run_dir / CONFIG_FILE)


def _write_into(out_dir: Path, write: object) -> None:
    """Run ``write(tmp_dir)`` and rename the result to ``out_dir`` (which must not exist or be empty)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SpardError(f"{out_dir} exists and is not empty; choose a new output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        write(tmp)  # type: ignore[operator]
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_run(run_dir: str | Path, out_dir: str | Path, *, merged: bool = False, push_to_hub: str | None = None,
               private: bool = False) -> ExportResult:
    """Export a finished run's adapter (default) or merged model, with its tokenizer and chat template, to
    ``out_dir``; with ``push_to_hub`` also upload it (checked first: nothing is exported if it cannot be)."""
    from spard.models import load_model, load_tokenizer, resolve_model_path

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    base, cfg = _finished_run(run_dir)
    require_safetensors(base, key=f"{run_dir / TRAIN_RESULT_FILE}: base_model")  # before any work, as load_model
    token = check_push_to_hub(push_to_hub) if push_to_hub else None
    # Merging needs the base in full precision (a 4/8-bit base cannot take the merged weights).
    model_args = replace(cfg.model, name_or_path=base, load_in_8bit=False, load_in_4bit=False)  # type: ignore[attr-defined]
    info = {"run_dir": str(run_dir.resolve()), "base_model": base, "defense": cfg.defense.name,  # type: ignore[attr-defined]
            "merged": merged}

    def write(tmp: Path) -> None:
        if merged:
            from peft import PeftModel

            model, tokenizer = load_model(model_args, device="cpu")
            model = PeftModel.from_pretrained(model, str(run_dir / FINAL_DIR), is_trainable=False).merge_and_unload()
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            base_path = resolve_model_path(base)
            tokenizer = load_tokenizer(base_path, model_args)
            shutil.copy2(run_dir / FINAL_DIR / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
            # Name the base the run trained on (an adapter of a model built in code names none), so
            # from_pretrained(out_dir) finds it: the hub id, or the local directory (embedded, aligned).
            adapter_config = json.loads((run_dir / FINAL_DIR / "adapter_config.json").read_text())
            adapter_config["base_model_name_or_path"] = base if is_hub_id(base) else str(Path(base_path).resolve())
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        tokenizer.save_pretrained(tmp)  # tokenizer files + chat template
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    _write_into(out_dir, write)
    result = ExportResult(out_dir, merged, base)
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(push_to_hub, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out_dir), repo_id=push_to_hub,
                          commit_message=f"spard export of {run_dir.name} ({'merged' if merged else 'adapter'})")
        result.hub_url = str(url)
    return result


sys.modules[__name__].__class__ = CallablePackage
