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
    ev = sub.add_parser("eval", help="(re-)evaluate a finished run directory",
                        description="(re-)evaluate a finished run directory")
    ev.add_argument("run_dir", help="a run directory written by spard train/run")
    ev.add_argument("overrides", nargs="*", help="eval.key=value overrides")
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
    from spard import api
    from spard.config import config_to_yaml, load_config

    if args.command == "eval":
        result = api.evaluate(args.run_dir, overrides=args.overrides)
        print(result.table)
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


if __name__ == "__main__":
    raise SystemExit(main())
