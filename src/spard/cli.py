"""``spard`` command line: a thin layer over the Python API (``spard.api``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from spard.errors import SpardError

KEYS_HELP = ("Configs are YAML; any key can be overridden as section.key=value, e.g. spard train "
             "configs/quickstart.yaml defense.name=sft attack.harmful_ratio=0.2. Every key, its default and what it "
             "does: spard show-config --doc (add defense.name=X to see that defense's options).")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spard",
        description="Fine-tune chat LLMs on untrusted data without losing their safety alignment.",
        epilog=KEYS_HELP,
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_: str, *, optional: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, epilog=KEYS_HELP)
        if optional:
            sp.add_argument("config", nargs="?", help="YAML config file (none: the defaults)")
        else:
            sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="section.key=value overrides")
        return sp

    with_config("align", "run the alignment stage (refusal SFT, merged; cached) and print where the model is")
    for name, help_ in (("train", "build the (poisoned) training set and fine-tune under the chosen defense"),
                        ("run", "align if configured, train, then evaluate before/after fine-tuning")):
        sp = with_config(name, help_)
        sp.add_argument("--dry-run", action="store_true", help="check every input, build and summarise the "
                        "training set (sizes by kind, truncation, attack prompts), then exit without training")
    show = with_config("show-config", "print the resolved config (defaults + file + overrides)", optional=True)
    show.add_argument("--doc", action="store_true", help="print every key with its documentation")
    eh = "(re-)evaluate a finished run directory, and its base model (cached), side by side"
    ev = sub.add_parser("eval", help=eh, description=eh)
    ev.add_argument("run_dir", help="a run directory written by spard train/run")
    ev.add_argument("overrides", nargs="*", help="eval.key=value overrides")
    ev.add_argument("--out", default=None, metavar="DIR", help="where to write this evaluation (default: the run's "
                    "eval/ for its own options, evals/<options>/ for other options: eval/ is never replaced by them)")
    jh = "judge the replies in a JSONL/CSV file of prompt + response rows; write verdicts and the ASR"
    jp = sub.add_parser("judge", help=jh, description=jh + ". Judge options as judge.key=value, e.g. "
                        "spard judge out.jsonl --judge openai judge.model=gpt-4o-mini")
    jp.add_argument("file", help="a .jsonl or .csv file with one prompt + response per row")
    jp.add_argument("overrides", nargs="*", help="judge.key=value options of the judge")
    jp.add_argument("--judge", default="keyword", help="keyword (default), classifier, openai, or another judge")
    jp.add_argument("--prompt-field", default="prompt", help="field / column with the prompt (default: prompt)")
    jp.add_argument("--response-field", default="response", help="field / column with the reply (default: response)")
    jp.add_argument("--category-field", default=None, help="optional field with a category: ASR per category too")
    jp.add_argument("--out", default=None, help="verdicts file (default: FILE's name + .verdicts.jsonl)")
    xh = "export a finished run: its LoRA adapter, or (--merged) the merged model, with tokenizer and chat template"
    xp = sub.add_parser("export", help=xh, description=xh)
    xp.add_argument("run_dir", help="a run directory written by spard train/run")
    xp.add_argument("out_dir", help="where to write the model (must not exist, or be empty)")
    xp.add_argument("--merged", action="store_true", help="merge the adapter into the base: a plain model directory")
    xp.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to this hub repo (needs a token)")
    xp.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    bh = "run a grid of defenses x attacks x harmful ratios (one run per cell), then write the table and plots"
    bp = sub.add_parser("bench", help=bh, description=bh + ". Rerunning skips finished cells and retries "
                        "crashed ones; --cell I runs one cell (job arrays), --collect only writes the outputs.")
    bp.add_argument("config", help="bench YAML (e.g. configs/bench/smoke.yaml)")
    mode = bp.add_mutually_exclusive_group()
    mode.add_argument("--cells", action="store_true", help="list the cells (index, name, status) and exit")
    mode.add_argument("--cell", type=int, metavar="I", help="run only cell I (then --collect when all are done)")
    mode.add_argument("--collect", action="store_true", help="only write results.csv, table.md and the plots")
    bp.add_argument("--retry", type=int, default=0, metavar="N", help="retry a crashing cell up to N more times now")
    bp.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="run N cells at a time, each in a worker process with 1/N of the cores "
                         "(perf/bench_workers.py measures whether that is faster on this machine)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option: `spard judge f.jsonl --judge openai
    # judge.model=x` leaves judge.model=x over; it is one of the judge's key=value options.
    if extra and args.command == "judge" and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from spard.redact import configure_logging

    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return _dispatch(args)
    except SpardError as e:
        from spard.redact import redact

        print(f"spard: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spard: interrupted; rerun with train.resume=true to continue from the last checkpoint",
              file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "bench":  # before importing api: --cells / --collect need no training stack
        return _bench(args)
    if args.command == "show-config":  # the config loader only: no model stack to import
        from spard.config import config_to_yaml, describe_config, load_config

        cfg = load_config(_config_path(args.config, args.overrides), args.overrides)
        print(describe_config(cfg) if args.doc else config_to_yaml(cfg), end="")
        return 0
    if args.command == "judge":  # the judges only: no training stack to import
        from spard.evaluate.judge_file import judge_file

        res = judge_file(args.file, args.judge, args.overrides, prompt_field=args.prompt_field,
                         response_field=args.response_field, category_field=args.category_field, out=args.out)
        print(res.table)
        print(f"verdicts: {res.verdicts}\nsummary: {res.summary_file}")
        return 0
    from transformers.utils import logging as hf_logging

    from spard import api
    from spard.config import load_config

    hf_logging.disable_progress_bar()  # weight loading/saving bars: noise between spard's own progress bars
    if args.command == "eval":
        _, after, table = api.evaluate_before_after(args.run_dir, overrides=args.overrides, out_dir=args.out)
        print(table)
        print(f"results: {after.out_dir}")
        others = [(d, o) for d, o in api.list_evaluations(args.run_dir) if d.resolve() != after.out_dir.resolve()]
        if others:
            print("other evaluations of this run:")
            for d, overrides in others:
                print(f"  {d}  ({' '.join(overrides) or 'the run config'})")
        return 0
    if args.command == "export":
        exported = api.export(args.run_dir, args.out_dir, merged=args.merged, push_to_hub=args.push_to_hub,
                              private=args.private)
        print(exported.summary())
        return 0
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "dry_run", False):
        found = api.plan(cfg, ("align", "train", "eval") if args.command == "run" else ("align", "train"))
        print(found.summary())
        print(_truncation_summary(cfg, found.records))
        print("dry run: nothing trained")
        return 0
    if args.command == "align":
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


def _config_path(config: str | None, overrides: list[str]) -> str | None:
    """``show-config key=value`` with no file: argparse puts the first override where the file goes."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        return None
    return config


def _truncation_summary(cfg: object, records: list) -> str:
    """Tokenise the planned training set with the model's tokenizer (no weights loaded) and count truncation.
    A dry run never executes model code: the tokenizer is loaded with ``trust_remote_code=False`` whatever the
    config says, and a tokenizer that needs its own code is not loaded at all."""
    from dataclasses import replace

    from spard.data.chat import tokenize_records
    from spard.models import load_tokenizer, resolve_model_path

    model = replace(cfg.model, trust_remote_code=False)  # type: ignore[attr-defined]
    path = resolve_model_path(model.name_or_path)
    try:
        tokenizer = load_tokenizer(path, model)
    except (OSError, ValueError) as e:
        if not cfg.model.trust_remote_code:  # type: ignore[attr-defined]
            raise
        return (f"truncation not counted: the tokenizer of {path} needs its own code (trust_remote_code), which a "
                f"dry run does not execute ({str(e).splitlines()[0][:160]})")
    _, stats = tokenize_records(tokenizer, records, cfg.data.max_length)  # type: ignore[attr-defined]
    return (f"tokenised with data.max_length={cfg.data.max_length}: {stats.truncated} of {stats.total} "  # type: ignore[attr-defined]
            f"truncated, {stats.no_target} with no reply token left")


def _bench(args: argparse.Namespace) -> int:
    from spard import benchmark

    b = benchmark.load_bench(args.config)
    if args.cells:
        print(benchmark.format_cell_list(b))
        return 0
    try:
        res = benchmark.bench(b, cell=args.cell, collect_only=args.collect, retry=args.retry, jobs=args.jobs)
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
