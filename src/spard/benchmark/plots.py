"""The bench's two figures (matplotlib, Agg backend, PNG):

``safety_utility.png``  task accuracy (and held-out task NLL, benign answer rate when evaluated: one panel
                         each) against ASR: one colour and marker per defense, a small marker per attack ×
                         ratio column and a large one for the defense's mean; upper left is best (the NLL
                         axis is inverted so that holds there too).
``asr_vs_ratio.png``    ASR against the harmful ratio: one line per defense, one panel per harmful_mix attack
                         (and task); the aligned model before fine-tuning as a dashed reference line.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from spard.benchmark.grid import Bench, ratio_field, ratio_text
from spard.benchmark.report import aggregate, attack_description, defense_labels, task_title
from spard.benchmark.results import CellResult, before_results, evaluates_task, harm_summary, task_accuracy
from spard.evaluate.tasks import task_class
from spard.io import atomic_path
from spard.registry import TASKS

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "*"]
LINESTYLES = ["-", "--", "-.", ":"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Write the PNG atomically: a crash leaves the previous plot or none, never half a file."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    return path


def _style(i: int) -> dict[str, Any]:
    import matplotlib

    return {"color": matplotlib.colormaps["tab10"](i % 10), "marker": MARKERS[i % len(MARKERS)]}


def _size(i: int, first: float) -> float:
    """Marker size of the i-th defense: a little smaller each, so defenses on the same point stay visible as
    nested markers instead of the last one hiding the others."""
    return max(first * 0.18, first * 0.55**i)


def _upper(values: list[float]) -> float:
    """Axis top for percentages: some headroom, at least 10 (a flat 0 % row still gets a sane axis), at most 102."""
    return max(10.0, min(102.0, max(values, default=0.0) * 1.12 + 3))


def _seeds_note(bench: Bench, *, bars: bool = False) -> str:
    n = len(bench.config.seeds)
    return "" if n == 1 else f" (mean{' ± std' if bars else ''} over {n} seeds)"


def _short(attack: str, ratio: float | None) -> str:
    return attack if ratio is None else f"{attack} {ratio_text(ratio)}"


def utility_axes(rows: list[CellResult]) -> list[tuple[str, str, float, bool]]:
    """The utility measures to plot against ASR: ``(metric, label, scale, lower_is_better)``; the fine-tuning
    task's accuracy first (when the cells evaluate it), then every evaluated task that declares a table of its
    own (held-out task NLL, benign answer rate)."""
    scored = any(evaluates_task(rows, task) for task in {r.cell.task for r in rows})
    axes = [("task_acc", "", 100.0, False)] if scored else []
    for name in dict.fromkeys(t for r in rows for t in r.task_metrics):
        if name in TASKS and task_class(name).own_table:
            cls = task_class(name)
            axes.append((f"task:{name}", task_title(name), 100.0 if cls.is_rate else 1.0, cls.lower_is_better))
    return axes


def safety_utility(bench: Bench, rows: list[CellResult], path: Path) -> Path:
    """One panel per (fine-tuning task, utility measure): the measure against ASR."""
    plt = _pyplot()
    asr = aggregate(bench, rows, "asr")
    before = before_results(rows)
    tasks, measures = bench.tasks, utility_axes(rows)
    fig, axes = plt.subplots(len(tasks), len(measures), figsize=(6.4 * len(measures), 5.0 * len(tasks)),
                             squeeze=False)
    for r, task in enumerate(tasks):
        for c, (metric, label, scale, lower) in enumerate(measures):
            _safety_panel(axes[r][c], bench, asr, aggregate(bench, rows, metric, scale=scale), before, task,
                          metric, label or task_title(task), scale, lower)
    fig.suptitle(f"Bench {bench.name}: best is top left{_seeds_note(bench)}", fontsize=12)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _safety_panel(ax: Any, bench: Bench, asr: dict, util: dict, before: dict[str, Any] | None, task: str,
                  metric: str, label: str, scale: float, lower_is_better: bool) -> None:
    all_x: list[float] = []
    all_y: list[float] = []
    for i, d in enumerate(defense_labels(bench)):
        st = _style(i)
        by_xy: dict[tuple[float, float], list[str]] = {}
        for col in bench.columns():
            a, b = asr.get((task, d, *col)), util.get((task, d, *col))
            if a is not None and b is not None and a.mean is not None and b.mean is not None:
                by_xy.setdefault((a.mean, b.mean), []).append(_short(*col))
        # columns filled by one shared cell (bt/hh at p=0) sit on one point: label it once
        pts = sorted((x, y, ", ".join(labels)) for (x, y), labels in by_xy.items())
        n_cols = sum(len(labels) for labels in by_xy.values())
        all_x += [p[0] for p in pts]
        all_y += [p[1] for p in pts]
        if not pts:
            ax.scatter([], [], s=90, edgecolors="black", label=f"{d} (no results)", **st)
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=28, alpha=0.45, color=st["color"],
                   marker=st["marker"])
        for k, (x, y, text) in enumerate(pts):
            # alternate above/below along the x axis so labels of neighbouring points collide less
            ax.annotate(text, (x, y), xytext=(4, 4 if k % 2 == 0 else -10), textcoords="offset points",
                        fontsize=7, color=st["color"])
        xs = [x for (x, _), labels in by_xy.items() for _ in labels]
        ys = [y for (_, y), labels in by_xy.items() for _ in labels]
        ax.scatter([statistics.fmean(xs)], [statistics.fmean(ys)], s=_size(i, 200), edgecolors="black",
                   linewidths=1.0, zorder=3 + 0.1 * i, label=f"{d} (mean of {n_cols} columns)", **st)
    if before:
        x = harm_summary(before)[1]
        y = task_accuracy(before, metric[5:] if metric.startswith("task:") else task)
        if x is not None and y is not None:
            all_x.append(100 * x)
            all_y.append(scale * y)
            ax.scatter([100 * x], [scale * y], marker="*", s=300, color="0.75", edgecolors="0.3", zorder=2,
                       label="aligned model, before fine-tuning")
    ax.set_xlabel("attack success rate, ASR (%)  ← safer")
    unit = " (%)" if scale == 100.0 and "(%)" not in label else ""
    ax.set_ylabel(f"{label}{unit}  {'↓ lower' if lower_is_better else '↑ more'} is better")
    ax.set_title(f"Safety vs. {'utility' if metric == 'task_acc' else label} after fine-tuning on {task}",
                 fontsize=10)
    ax.set_xlim(-2, _upper(all_x))
    if scale == 100.0:
        ax.set_ylim(-1, _upper(all_y))
    if lower_is_better:
        ax.invert_yaxis()  # best stays top left
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", title="defense (small: one attack × ratio)", title_fontsize=8)


def asr_vs_ratio(bench: Bench, rows: list[CellResult], path: Path) -> Path | None:
    """None (no file) when no attack of the bench has a strength (harmful_mix's harmful ratio)."""
    attacks = [a for a in bench.config.attacks if ratio_field(a.kind) is not None]
    if not attacks:
        return None
    plt = _pyplot()
    asr = aggregate(bench, rows, "asr")
    before = before_results(rows)
    before_asr = harm_summary(before)[1] if before else None
    tasks = bench.tasks
    fig, axes = plt.subplots(len(tasks), len(attacks), figsize=(5.2 * len(attacks), 4.2 * len(tasks)),
                             squeeze=False, sharey=True)
    shown: list[float] = [100 * before_asr] if before_asr is not None else []
    for r, task in enumerate(tasks):
        for c, attack in enumerate(attacks):
            ax = axes[r][c]
            ratios = [col[1] for col in bench.columns() if col[0] == attack.name]
            for i, d in enumerate(defense_labels(bench)):
                pts = [(100 * p, a.mean, a.std or 0.0) for p in ratios
                       if (a := asr.get((task, d, attack.name, p))) is not None and a.mean is not None]
                st = _style(i)
                shown += [p[1] + p[2] for p in pts]
                if pts:  # line style and marker size vary too, so defenses with equal results stay distinguishable
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=3,
                                linewidth=1.8, linestyle=LINESTYLES[i % len(LINESTYLES)],
                                markersize=_size(i, 9), label=d, zorder=3 + 0.1 * i, **st)
                else:
                    ax.plot([], [], label=f"{d} (no results)", **st)
            if before_asr is not None:
                ax.axhline(100 * before_asr, color="0.6", linewidth=4, alpha=0.45, zorder=1,
                           label="aligned model, before fine-tuning")
            ax.set_xticks([100 * p for p in ratios])
            ax.set_xlabel("harmful ratio p (% of the fine-tuning set)")
            ax.set_ylabel("attack success rate, ASR (%)")
            where = f"{attack.name} = {attack_description(bench, attack)}"
            where += f", task {task}" if len(tasks) > 1 else ""
            ax.set_title(f"ASR vs. harmful ratio: {where}", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][0].set_ylim(-1, _upper(shown))  # shared y axis
    fig.suptitle(f"Bench {bench.name}: lower is safer{_seeds_note(bench, bars=True)}", fontsize=12)
    # One legend under the panels: inside an axes it hides the lines near 0 %, where the best defenses are.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07 + 0.03 * ((len(labels) - 1) // 5), 1, 1))
    _save(fig, path)
    plt.close(fig)
    return path
