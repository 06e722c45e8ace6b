"""Plot the alignment recipes of docs/results/alignment: harmful answer rate against benign refusal, one point
per recipe (marker by method: SFT, DPO, SFT then DPO; filled when full-parameter), the Pareto front and the
"aligned" bar.

    python examples/align_pareto.py docs/results/alignment/recipes.jsonl docs/results/alignment/pareto.png

Each input line is one measured recipe: ``{"recipe", "method", "full_finetune", "asr", "benign_refusal", ...}``
(rates in percent; ``examples/align_sweep.py --out`` rows are converted by ``--from-sweep``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from spard.benchmark.stats import pareto_front
from spard.io import atomic_path

MARKERS = {"sft": "o", "dpo": "s", "sft+dpo": "D"}


def from_sweep(row: dict[str, Any], measured: str) -> dict[str, Any]:
    """A recipe line from one ``align_sweep.py --out`` row (whose recipe string holds the overrides)."""
    overrides = dict(item.split("=", 1) for item in row["recipe"].split())
    scores = row["scores"]
    return {"recipe": row["recipe"], "method": overrides.get("align.method", "sft"),
            "full_finetune": overrides.get("align.full_finetune", "false") == "true", "steps": row["steps"],
            "asr": round(scores["ASR I-MaliciousInstructions"], 1),
            "benign_refusal": round(100 - scores["benign answered"], 1),
            "by_set": {k.removeprefix("answered "): round(v, 1) for k, v in scores.items()
                       if k.startswith("answered ")},
            "align_wall_s": row["align_wall_s"], "align_cpu_s": row["align_cpu_s"], "measured": measured}


def plot(recipes: list[dict[str, Any]], out: Path, *, max_asr: float, max_refusal: float) -> list[int]:
    """Write the figure; returns the indices of the recipes on the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["benign_refusal"], r["asr"]) for r in recipes]
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    ax.add_patch(plt.Rectangle((0, 0), max_refusal, max_asr, color="tab:green", alpha=0.12, lw=0))
    ax.text(1, 1.5, "the bar", color="tab:green", fontsize=9)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey", lw=1,
            label="Pareto front")
    for method, marker in MARKERS.items():
        for full in (False, True):
            idx = [i for i, r in enumerate(recipes) if r["method"] == method and r["full_finetune"] == full]
            if idx:
                ax.scatter([points[i][0] for i in idx], [points[i][1] for i in idx], marker=marker, s=46,
                           facecolors="tab:blue" if full else "none", edgecolors="tab:blue",
                           label=f"{method.upper()}, {'full' if full else 'LoRA'}")
    for i, r in enumerate(recipes):
        if r.get("label"):
            ax.annotate(r["label"], points[i], textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("benign refusal % (I-Alpaca + I-PhysicalSafetySafe, 60 prompts)")
    ax.set_ylabel("harmful answer rate % (I-MaliciousInstructions, 40 prompts)")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.set_title("SmolLM2-135M-Instruct aligned by spard: every recipe tried")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
    return front


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", type=Path, help="JSONL, one measured recipe a line")
    ap.add_argument("out", type=Path, help="the PNG to write")
    ap.add_argument("--max-asr", type=float, default=20.0)
    ap.add_argument("--max-benign-refusal", type=float, default=15.0)
    args = ap.parse_args()
    recipes = [json.loads(line) for line in args.recipes.read_text().splitlines() if line.strip()]
    front = plot(recipes, args.out, max_asr=args.max_asr, max_refusal=args.max_benign_refusal)
    for i in front:
        r = recipes[i]
        print(f"front: {r['recipe']}: ASR {r['asr']} %, benign refusal {r['benign_refusal']} %")


if __name__ == "__main__":
    main()
