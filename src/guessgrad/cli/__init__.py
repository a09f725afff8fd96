"""The ``guessgrad`` command: ``train``, ``reproduce``, ``report``, ``diagnose`` and ``bench``.

    guessgrad train --method w-perp --k 10 --width 128 --epochs 300
    guessgrad reproduce table3 --quick
    guessgrad report table3 --quick

Bad options and unknown names exit with status 2 and a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from .common import UsageError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) instead of usage dumps; arguments that
    no option takes are reported by the subcommand's parser (its ``--help``), with the closest
    option name where one is close."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # no abbreviations: ``--seed`` must not silently mean ``--seeds`` (or start a sweep)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        argv = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(argv, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            owner = self.commands.get(command or "", self)
            first = argv.index(command) if command in argv else len(argv)
            if any(e in argv[:first] for e in extras):  # before the command: ours
                owner = self
            options = [o for a in owner._actions for o in a.option_strings if o.startswith("--")]
            message = f"unrecognized arguments: {' '.join(extras)}"
            for extra in extras:
                name = extra.split("=")[0]
                close = difflib.get_close_matches(name, options, n=1)
                if name.startswith("--") and len(name) > 2 and close:
                    message += f" (did you mean {close[0]}?)"
                    break
            owner.error(message)
        if self.commands and getattr(parsed, "command", None) is None:
            # checked here, after the unknown options: ``guessgrad --vers`` is a misspelt
            # option (with a suggestion), not a missing command
            self.error("the following arguments are required: COMMAND")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """The ``guessgrad`` argument parser with every subcommand."""
    from . import bench, diagnose, reproduce, train

    parser: _Parser = _Parser(
        prog="guessgrad",
        description="Backpropagation-free training by guessing gradients (W̃⊥ and baselines).",
    )
    parser.add_argument("--version", action="version", version=f"guessgrad {__version__}")
    # the command is required: parse_args says so once it has reported unknown options
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    train.configure_parser(sub)
    reproduce.configure_parsers(sub)
    diagnose.configure_parser(sub)
    bench.configure_parser(sub)
    parser.commands = dict(sub.choices)
    return parser


#: what Ctrl-C or SIGTERM leaves to resume, per command (bench, diagnose, report keep nothing;
#: ``train`` says what its run folder holds, as the interrupt's ``kept``)
_KEPT = {"reproduce": "finished runs are kept; run the same command again to resume"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # while starting up (parsing, importing torch): nothing begun
        print("\ninterrupted.", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..experiments.runner import Terminated, _exit_on_signal, plain_warnings, temporary_handler

    formatter = warnings.formatwarning
    plain_warnings()  # for the command's own lines; the caller's formatting comes back after
    # SIGTERM stops every command as Ctrl-C does (a sweep's pool sets the same handler)
    with temporary_handler(signal.SIGTERM, _exit_on_signal):
        try:
            return int(args.func(args) or 0)
        except UsageError as err:
            print(f"guessgrad {args.command}: error: {err}", file=sys.stderr)
            return 2
        except (KeyboardInterrupt, Terminated) as err:
            kept = getattr(err, "kept", None) or _KEPT.get(args.command)
            more = f": {kept}" if kept else ""
            what = "terminated" if isinstance(err, Terminated) else "interrupted"
            print(f"\n{what}{more}.", file=sys.stderr)
            return 128 + signal.SIGTERM if isinstance(err, Terminated) else 130
        except BrokenPipeError:  # stdout closed early (``| head``): stop quietly, as on SIGPIPE
            try:  # the interpreter's last flush goes nowhere
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError, AttributeError):  # no file descriptor (a StringIO, None)
                pass
            return 141
        finally:
            warnings.formatwarning = formatter
