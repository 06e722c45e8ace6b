"""``spard`` command line: a thin layer over the Python API (``spard.api``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from spard.errors import SpardError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spard",
        description="Fine-tune chat LLMs on untrusted data without losing their safety alignment.",
        epilog="Configs are YAML; any field can be overridden as section.key=value, "
        "e.g. spard train configs/quickstart.yaml defense.name=sft attack.harmful_ratio=0.2",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="section.key=value overrides")
        return sp

    with_config("align", "run the alignment stage (refusal SFT, merged; cached) and print where the model is")
    with_config("train", "build the (poisoned) training set and fine-tune under the chosen defense")
    with_config("run", "align if configured, train, then evaluate before/after fine-tuning")
    with_config("show-config", "print the resolved config (defaults + file + overrides)")
    eh = "(re-)evaluate a finished run directory, and its base model (cached), side by side"
    ev = sub.add_parser("eval", help=eh, description=eh)
    ev.add_argument("run_dir", help="a run directory written by spard train/run")
    ev.add_argument("overrides", nargs="*", help="eval.key=value overrides")
    bh = "run a grid of defenses x attacks x harmful ratios (one run per cell), then write the table and plots"
    bp = sub.add_parser("bench", help=bh, description=bh + ". Rerunning skips finished cells and retries "
                        "crashed ones; --cell I runs one cell (job arrays), --collect only writes the outputs.")
    bp.add_argument("config", help="bench YAML (e.g. configs/bench/smoke.yaml)")
    mode = bp.add_mutually_exclusive_group()
    mode.add_argument("--cells", action="store_true", help="list the cells (index, name, status) and exit")
    mode.add_argument("--cell", type=int, metavar="I", help="run only cell I (then --collect when all are done)")
    mode.add_argument("--collect", action="store_true", help="only write results.csv, table.md and the plots")
    bp.add_argument("--retry", type=int, default=0, metavar="N", help="retry a crashing cell up to N more times now")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except SpardError as e:
        print(f"spard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spard: interrupted; rerun with train.resume=true to continue from the last checkpoint",
              file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "bench":  # before importing api: --cells / --collect need no training stack
        return _bench(args)
    from spard import api
    from spard.config import config_to_yaml, load_config

    if args.command == "eval":
        _, _, table = api.evaluate_before_after(args.run_dir, overrides=args.overrides)
        print(table)
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "show-config":
        print(config_to_yaml(cfg), end="")
    elif args.command == "align":
        res = api.align(cfg)
        print(f"aligned model: {res.model_dir}" + (" (cached)" if res.cached else ""))
    elif args.command == "train":
        res = api.train(cfg)
        m = res.metrics
        print(f"run dir: {res.run_dir}\nadapter: {res.adapter_dir}\n"
              f"loss {m.get('first_loss')} -> {m.get('last_loss')} over {m.get('steps')} steps "
              f"({m.get('train_seconds')} s, {m.get('seconds_per_step')} s/step)")
    elif args.command == "run":
        res = api.run(cfg)
        print(res.table)
        print(f"run dir: {res.train.run_dir}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from spard import benchmark

    b = benchmark.load_bench(args.config)
    if args.cells:
        print(benchmark.format_cell_list(b))
        return 0
    try:
        res = benchmark.bench(b, cell=args.cell, collect_only=args.collect, retry=args.retry)
    except KeyboardInterrupt:
        print("spard: interrupted; rerun the same command to continue (finished cells are skipped, "
              "partial ones resume)", file=sys.stderr)
        return 130
    if res.outcomes:
        counts = {s: sum(o.status == s for o in res.outcomes) for s in ("ran", "skipped", "failed", "stale")}
        print("cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    for o in res.failed:
        print(f"FAILED cell {o.cell.index} {o.cell.name}: {o.error} (see {o.cell.run_dir / 'error.txt'})")
    if res.report is not None:
        print(res.report.table, end="")
        print("wrote " + ", ".join(str(p) for p in res.report.files.values()))
    return 1 if res.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
