"""The `fastdiff` command: a small dispatcher; each subcommand lives in its own module.

    fastdiff sample   fastdiff/sample_cmd.py   a grid of samples, or one file per seed (bulk mode)
    fastdiff train    fastdiff/train.py        train the digits U-Net
    fastdiff eval     fastdiff/evaluate.py     quality against model evaluations, per solver
    fastdiff bench    fastdiff/bench.py        speed benchmarks

A subcommand module provides `add_arguments(parser)` and `main(args) -> int`. Every failure
prints one line, `fastdiff: error: ...`, without a traceback: errors a user can fix
(ValueError, OSError, a bad model file) exit with status 2; a run that failed on its way
(an unwritable output file, a failed rank, a non-finite model output or training loss)
with status 1. Under several ranks the line names the rank.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "sample": ("fastdiff.sample_cmd", "sample the embedded digits model (or --model) into a PNG grid, "
                                      "or one file per seed with --outdir"),
    "train": ("fastdiff.train", "train a class-conditional U-Net on scikit-learn's digits"),
    "eval": ("fastdiff.evaluate", "sample quality (classifier accuracy, Fréchet distance) vs model evaluations"),
    "bench": ("fastdiff.bench", "speed benchmarks"),
}
EXIT_USAGE, EXIT_FAILED = 2, 1


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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastdiff` console script; returns the exit status."""
    from .distributed import PeerFailedError, RankFailedError
    from .models.io import ModelFileError
    from .output_files import OutputError

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
        print(f"fastdiff: error: {_rank_prefix(e)}{one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except (OutputError, RankFailedError, PeerFailedError, FloatingPointError) as e:
        print(f"fastdiff: error: {_rank_prefix(e)}{one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130


def _rank_prefix(e: BaseException) -> str:
    """"rank N: " on a rank of a multi-process run (torchrun), unless the message names it."""
    import os

    from .distributed import PeerFailedError, RankFailedError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not isinstance(e, (PeerFailedError, RankFailedError)):
        return f"rank {os.environ.get('RANK', '?')}: "
    return ""


def one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename!r}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
