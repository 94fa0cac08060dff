"""Every command line the README and docs/*.md show parses as written, for the absl entry points
and the argparse ones (bench, convert, pretrained.export): its flags exist and every required flag
is there (optional groups in ``[...]`` are left out). Until 2026-12-07 the README's evaluate
command lacked ``--out`` and ``--data`` and stopped at once, and the export command was checked as
an absl one (its flags looked unknown); the ```python snippets are run by tests/test_docs_snippets.py."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_FENCES = ("", "sh", "bash", "shell")  # a fence's info string for a block of command lines
COMMAND = re.compile(r"^(?:\S*python3?)\s+-m\s+(nativetok_jax[\w.]*)\s*(.*)$")
# The absl entry points (bench and convert are argparse: their --help is tested in test_command_line.py).
ABSL = ("nativetok_jax.main", "nativetok_jax.evaluate", "nativetok_jax.sample", "nativetok_jax.grain_thresholds",
        "nativetok_jax.experiments.token_order",
        "nativetok_jax.experiments.dynamic_grain", "nativetok_jax.experiments.grain_routing")

# The argparse entry points, and the module whose ``main(argv)`` parses their command line.
ARGPARSE = {"nativetok_jax.bench": "nativetok_jax.bench.__main__", "nativetok_jax.convert": "nativetok_jax.convert",
            "nativetok_jax.pretrained.export": "nativetok_jax.pretrained.export"}

# Parses each argv with the module's own flags in a fresh process (several modules define their
# flags in absl's global FlagValues); prints one JSON line of (argv, error or None).
PARSER = """
import importlib, json, sys
from absl import flags
module = importlib.import_module(sys.argv[1])
try:  # some modules define their flags only when run as the program
    module.define_flags()
except (AttributeError, flags.DuplicateFlagError):
    pass
values = getattr(module, "FLAGS", flags.FLAGS)
for argv in json.loads(sys.argv[2]):
    values.unparse_flags()
    try:
        values([sys.argv[1], *argv])
        print(json.dumps([argv, None]))
    except flags.Error as error:
        print(json.dumps([argv, str(error)]))
"""

# Runs each argv through the module's ``main`` until its parser has parsed it (then stops: nothing is
# run); argparse's own error (usage on stderr, exit 2) is the failure; one JSON line per argv.
ARGPARSE_PARSER = """
import argparse, contextlib, importlib, io, json, sys
class Parsed(Exception):
    pass
parse_args = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    parse_args(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_then_stop
module = importlib.import_module(sys.argv[1])
for argv in json.loads(sys.argv[2]):
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            module.main(argv)
        print(json.dumps([argv, "main returned without parsing its command line"]))
    except Parsed:
        print(json.dumps([argv, None]))
    except SystemExit as error:
        print(json.dumps([argv, (stderr.getvalue().strip().splitlines() or [str(error.code)])[-1]]))
"""


def documented_commands() -> dict[str, list[tuple[str, list[str]]]]:
    """``{module: [(FILE:LINE, argv), ...]}`` of every documented ``python -m nativetok_jax...`` line."""
    import shlex

    found: dict[str, list[tuple[str, list[str]]]] = {}
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        with open(path) as f:
            text = f.read()
        for line_number, block in shell_blocks(text):
            for line in block.replace("\\\n", " ").splitlines():
                match = COMMAND.match(line.split(" #")[0].strip())
                if match:
                    args = re.sub(r"\[[^\]]*\]", " ", match.group(2))  # optional groups
                    where = f"{os.path.relpath(path, ROOT)}:{line_number}"
                    found.setdefault(match.group(1), []).append((where, shlex.split(args)))
                line_number += 1
    return found


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line's number, text)`` of every fenced block whose info string is empty, sh, bash or
    shell. Fences pair in order: a ```python block's closing fence is not an opening one (a regex
    from one bare fence to the next paired it with the next block's opening, and skipped that block)."""
    blocks, opening, info = [], None, ""
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.startswith("```"):
            continue
        if opening is None:
            opening, info = number, line[3:].strip()
        else:
            if info in SHELL_FENCES:
                blocks.append((opening + 1, "\n".join(lines[opening:number - 1])))
            opening = None
    return blocks


def test_fences_pair_in_order_so_a_python_block_hides_no_shell_block():
    text = "```\npython -m a\n```\n```python\nx = 1\n```\nprose\n```sh\npython -m b\n```\n"
    assert shell_blocks(text) == [(2, "python -m a"), (9, "python -m b")]


def test_the_docs_show_commands_of_every_kind():
    commands = documented_commands()
    assert {"nativetok_jax.main", "nativetok_jax.evaluate", "nativetok_jax.sample"} <= set(commands)
    assert ["--workdir", "workdirs/demo", "--data", "photos", "--out", "workdirs/demo/evaluate.json"] in [
        argv for _, argv in commands["nativetok_jax.evaluate"]]


@pytest.mark.slow
@pytest.mark.parametrize("module", [*ABSL, *ARGPARSE])
def test_every_documented_command_line_parses(module):
    commands = documented_commands().get(module, [])
    if not commands:
        pytest.skip(f"the docs show no {module} command")
    parser, target = (ARGPARSE_PARSER, ARGPARSE[module]) if module in ARGPARSE else (PARSER, module)
    result = subprocess.run([sys.executable, "-c", parser, target, json.dumps([argv for _, argv in commands])],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(outcomes) == len(commands), result.stdout
    failures = [f"{where}: {' '.join(argv)}: {error}" for (where, _), (argv, error) in zip(commands, outcomes) if error]
    assert not failures, "\n".join(failures)
