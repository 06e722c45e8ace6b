"""Fine-tune a chat model with your own TRL ``SFTTrainer`` script, under a spard defense.

    pip install trl
    python examples/hf_trainer.py --defense spard --max-steps 20 tau=0.2
    python examples/hf_trainer.py --model Qwen/Qwen2.5-0.5B-Instruct --defense safegrad lambda_align=0.5
    python examples/hf_trainer.py --defense safeinstr        # a data defense: augment_dataset, no callback
    python examples/hf_trainer.py --model embedded --max-steps 2 --n-train 16    # a quick check

The data is the user's task (spard's packaged GSM8K copy) poisoned with 10 % BeaverTails harmful pairs, as a
``messages`` dataset; the model is the embedded SmolLM2-135M-Instruct (``--model embedded``, offline) or any
hub id / local chat model. Afterwards, score the model with ``spard judge`` on its replies, or evaluate the
saved adapter with spard's own evaluation.
"""

from __future__ import annotations

import argparse
import random

import torch
import yaml
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from spard.args import ModelArgs
from spard.data.sources import load_source
from spard.hf import DefenseCallback, augment_dataset, is_data_defense
from spard.models import load_model
from spard.registry import DEFENSES


def poisoned_dataset(n: int, harmful_ratio: float, seed: int) -> Dataset:
    rng = random.Random(seed)
    n_harmful = round(n * harmful_ratio)
    records = rng.sample(load_source("gsm8k"), n - n_harmful) + rng.sample(load_source("beavertails"), n_harmful)
    rng.shuffle(records)
    return Dataset.from_list([{"messages": list(r.messages)} for r in records])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded, a hub id or a local chat model")
    p.add_argument("--defense", default="spard", choices=DEFENSES.names())
    p.add_argument("--n-train", type=int, default=96)
    p.add_argument("--harmful-ratio", type=float, default=0.1)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--output-dir", default="runs/hf-trainer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("options", nargs="*", help="defense options as key=value, e.g. tau=0.2 safety_k=8")
    a = p.parse_args()
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in a.options)}

    model, tokenizer = load_model(ModelArgs(name_or_path=a.model))
    dataset = poisoned_dataset(a.n_train, a.harmful_ratio, a.seed)
    callbacks = []
    if is_data_defense(a.defense):  # SafeInstr, PTST: no callback, an augmented dataset
        dataset = augment_dataset(dataset, a.defense, seed=a.seed, **options)
    else:
        callbacks.append(DefenseCallback(a.defense, max_length=384, **options))

    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset, callbacks=callbacks,
        args=SFTConfig(output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=8,
                       learning_rate=2e-4, lr_scheduler_type="constant", max_length=384, logging_steps=1,
                       save_steps=50, seed=a.seed, bf16=torch.cuda.is_available(), report_to=[]),
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    trainer.train()
    trainer.save_model()
    print(f"adapter: {a.output_dir}")


if __name__ == "__main__":
    main()
