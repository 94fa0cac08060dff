"""The task registry (nativetok_jax/tasks.py): every part an entry names resolves, and no module
but the registry (and at most one more) compares or dispatches on a task's name (issue 23)."""

import ast
import inspect
import os

import ml_collections
import pytest

from nativetok_jax import tasks
from nativetok_jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_part_an_entry_names_resolves_to_what_its_command_calls(name):
    task = tasks.TASKS[name]
    assert task.name == name
    assert list(inspect.signature(task.load("train")).parameters)[:2] == ["config", "workdir"]
    for part in ("export", "evaluate"):
        if getattr(task, part) is not None:
            assert callable(task.load(part).from_checkpoint)
    assert callable(task.load("export").save_pretrained)
    if task.sample is not None:
        assert list(inspect.signature(task.load("sample")).parameters) == ["workdir", "out", "flags"]
    if task.bench is not None:
        task.load("bench")


def test_an_unknown_task_is_one_line_naming_the_field():
    with pytest.raises(ConfigError, match=r"^config.task: must be one of \('tokenizer', .*got 'toy'$"):
        tasks.of(ml_collections.ConfigDict({"task": "toy"}))
    with pytest.raises(ConfigError, match="task 'dvae' has no sample"):
        tasks.TASKS["dvae"].load("sample")


def test_a_config_without_a_task_is_a_tokenizer_run():
    assert tasks.of(ml_collections.ConfigDict({"model": {}})).name == "tokenizer"


def task_name_dispatch(source: str, names: set[str]) -> int:
    """How many places in ``source`` compare something named ``task`` with a task's name
    (``config.get("task") == "d2it"``, ``task in ("generator", "diffusion")``) or key a dict
    literal by two or more task names (a dispatch table)."""

    def literals(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value} & names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(set(), *(literals(e) for e in node.elts))
        return set()

    count = 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(literals(s) for s in sides) and any("task" in ast.unparse(s) for s in sides if not literals(s)):
                count += 1
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            count += len(keys & names) >= 2
    return count


def test_the_dispatch_finder_finds_planted_comparisons_and_tables():
    names = set(tasks.TASKS)
    assert task_name_dispatch('if config.get("task") == "d2it": pass', names) == 1
    assert task_name_dispatch('if task in ("generator", "diffusion"): pass', names) == 1
    assert task_name_dispatch('f = {"dvae": a, "d2it": b}[task]', names) == 1
    assert task_name_dispatch('if model.kind == "dvae": pass', names) == 0  # a model option, not a task


def test_no_module_but_the_registry_and_one_more_dispatches_on_a_task_name():
    names = set(tasks.TASKS)
    found = {}
    for directory, _, files in os.walk(os.path.join(ROOT, "nativetok_jax")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with open(path) as f:
                    count = task_name_dispatch(f.read(), names)
                if count:
                    found[os.path.relpath(path, ROOT)] = count
    found.pop(os.path.join("nativetok_jax", "tasks.py"), None)
    # config.py's config_from_dict picks a stored config's defaults by its task (the schemas' module).
    assert len(found) <= 1, f"modules comparing or dispatching on task names besides the registry: {found}"
