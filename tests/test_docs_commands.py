"""Every command line the README and docs/*.md show for an absl entry point parses as written:
its flags exist and every required flag is there (optional groups in ``[...]`` are left out).
Until 2026-12-07 the README's evaluate command lacked ``--out`` and ``--data`` and stopped at once;
the ```python snippets are run by tests/test_docs_snippets.py."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```(?:sh|bash|shell)?[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMAND = re.compile(r"^(?:\S*python3?)\s+-m\s+(nativetok_jax[\w.]*)\s*(.*)$")
# The absl entry points (bench and convert are argparse: their --help is tested in test_command_line.py).
ABSL = ("nativetok_jax.main", "nativetok_jax.evaluate", "nativetok_jax.sample", "nativetok_jax.grain_thresholds",
        "nativetok_jax.pretrained.export", "nativetok_jax.experiments.token_order",
        "nativetok_jax.experiments.dynamic_grain", "nativetok_jax.experiments.grain_routing")

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


def documented_commands() -> dict[str, list[tuple[str, list[str]]]]:
    """``{module: [(FILE:LINE, argv), ...]}`` of every documented ``python -m nativetok_jax...`` line."""
    import shlex

    found: dict[str, list[tuple[str, list[str]]]] = {}
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        with open(path) as f:
            text = f.read()
        for fence in FENCE.finditer(text):
            line_number = text.count("\n", 0, fence.start()) + 2
            for line in fence.group(1).replace("\\\n", " ").splitlines():
                match = COMMAND.match(line.split(" #")[0].strip())
                if match:
                    args = re.sub(r"\[[^\]]*\]", " ", match.group(2))  # optional groups
                    where = f"{os.path.relpath(path, ROOT)}:{line_number}"
                    found.setdefault(match.group(1), []).append((where, shlex.split(args)))
                line_number += 1
    return found


def test_the_docs_show_commands_of_every_kind():
    commands = documented_commands()
    assert {"nativetok_jax.main", "nativetok_jax.evaluate", "nativetok_jax.sample"} <= set(commands)
    assert ["--workdir", "workdirs/demo", "--data", "photos", "--out", "workdirs/demo/evaluate.json"] in [
        argv for _, argv in commands["nativetok_jax.evaluate"]]


@pytest.mark.slow
@pytest.mark.parametrize("module", ABSL)
def test_every_documented_command_line_parses(module):
    commands = documented_commands().get(module, [])
    if not commands:
        pytest.skip(f"the docs show no {module} command")
    result = subprocess.run([sys.executable, "-c", PARSER, module, json.dumps([argv for _, argv in commands])],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(outcomes) == len(commands), result.stdout
    failures = [f"{where}: {' '.join(argv)}: {error}" for (where, _), (argv, error) in zip(commands, outcomes) if error]
    assert not failures, "\n".join(failures)
