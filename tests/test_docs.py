"""Every ``guessgrad`` command in the README and docs/ parses with the current command line, and
names experiments, widths, methods and estimator options that exist.

Commands are taken from fenced code blocks (a trailing ``\\`` joins lines, ``# ...`` comments
are dropped); lines with placeholders (``SOLVER``, ``table1|table2``, ``[options]``) are not
commands.  Parsing only: nothing is trained.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from guessgrad import make_estimator
from guessgrad.bench import parse_method
from guessgrad.cli import build_parser
from guessgrad.cli.common import check_estimator, estimator_options
from guessgrad.cli.reproduce import select

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(path: Path) -> list[str]:
    commands, block, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            block, pending = not block, ""
            continue
        if not block:
            continue
        text = pending + line.split(" #")[0].strip()
        pending = ""
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        placeholder = re.search(r"\b[A-Z]+\b|[|<\[]", text.removeprefix("guessgrad"))
        if text.startswith("guessgrad ") and not placeholder:
            commands.append(text)
    return commands


CASES = [(p.name, c) for p in DOCS for c in _commands(p)]


def test_the_docs_have_commands() -> None:
    names = {name for name, _ in CASES}
    assert {"README.md", "reproduction.md", "benchmarks.md", "results.md"} <= names
    assert len(CASES) >= 20


@pytest.mark.parametrize(("doc", "command"), CASES, ids=[f"{d}:{c[:60]}" for d, c in CASES])
def test_documented_commands_parse(doc: str, command: str) -> None:
    try:
        args = build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as exit_:  # pragma: no cover - the failure message names the command
        pytest.fail(f"{doc}: `{command}` does not parse (status {exit_.code})")
    # and the names in it exist: experiments and their selections, estimators and options
    if args.command in ("reproduce", "report"):
        assert select(args)
    elif args.command == "bench":
        for spec in args.methods.split(","):
            name, options = parse_method(spec)
            make_estimator(name, **options)
    elif args.command == "train":
        check_estimator(args.method, estimator_options(args))


def test_the_newton_schulz_table_is_the_shipped_fit() -> None:
    """docs/newton_schulz.md's table of the fitted sets, row by row, is the shipped JSON
    rounded as printed: bands, errors and the coefficients a, b, c, d."""
    import json

    shipped = json.loads(
        (ROOT / "src" / "guessgrad" / "solvers" / "ns_coefficients.json").read_text()
    )["sets"]
    text = (ROOT / "docs" / "newton_schulz.md").read_text()
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| 0.")
    ]
    assert len(rows) == len(shipped) == 9
    for row, fit in zip(rows, shipped):
        lo, hi = fit["band"]
        assert row[0] == f"{fit['threshold']:g}"
        assert row[1] == f"({lo:.2f}, {hi:.2f})"
        assert row[2] == f"{fit['max_error_outside_band']:.2e}"
        assert row[3] == f"{fit['rms_error_outside_band']:.2e}"
        assert row[4:] == [f"{c:.5f}" for c in fit["coefficients"]]


def test_the_extending_guide_runs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """docs/extending.md's Python blocks run as written (a custom guess trained, diagnosed
    against activation perturbation with its own asserts, and registered), in a child
    process, so that its registration does not reach this session's registry-driven tests."""
    import os
    import subprocess
    import sys

    text = (ROOT / "docs" / "extending.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks, "docs/extending.md has no Python block"
    env = dict(os.environ)
    env["GUESSGRAD_CACHE"] = str(tmp_path_factory.getbasetemp() / "guessgrad-cache")
    env.setdefault("OMP_NUM_THREADS", "1")
    done = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ForwardGradient(guess='ActiveUnitsGuess()'" in done.stdout
