"""The `fastdiff` command: a small dispatcher; each subcommand lives in its own module.

    fastdiff sample   fastdiff/sample_cmd.py   a grid of class-conditional samples
    fastdiff train    fastdiff/train.py        train the digits U-Net
    fastdiff eval     fastdiff/evaluate.py     quality against model evaluations, per solver
    fastdiff bench    fastdiff/bench.py        speed benchmarks

A subcommand module provides `add_arguments(parser)` and `main(args) -> int`. Errors a
user can fix (ValueError, OSError, a bad model file) print one line, `fastdiff: error: ...`,
and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "sample": ("fastdiff.sample_cmd", "sample the embedded digits model (or --model) into a PNG grid"),
    "train": ("fastdiff.train", "train a class-conditional U-Net on scikit-learn's digits"),
    "eval": ("fastdiff.evaluate", "sample quality (classifier accuracy, Fréchet distance) vs model evaluations"),
    "bench": ("fastdiff.bench", "speed benchmarks"),
}
EXIT_USAGE = 2


class CommandError(Exception):
    """An error the user can fix; main() prints it as one line and exits with status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line, `fastdiff: error: ...`, like ours."""

    def error(self, message: str):
        raise CommandError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastdiff", description="Fast, reproducible sampling for diffusion models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # a missing dependency inside the module is a real error
                raise
            continue  # a subcommand not written yet (bench) is simply not offered
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(run=module.main)
        if name == "sample":  # bulk mode, --seeds A-B --outdir DIR: fastdiff/bulk.py
            from . import bulk

            bulk.add_sample_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastdiff` console script; returns the exit status."""
    from .models.io import ModelFileError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is None:
            parser.print_help()
            return EXIT_USAGE
        return int(args.run(args) or 0)
    except SystemExit as e:  # --help, or a subcommand that exits on its own
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (CommandError, ModelFileError, ValueError, OSError) as e:
        print(f"fastdiff: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130


def one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename!r}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
