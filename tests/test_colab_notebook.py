"""The Colab notebook runs as shipped, twice in a row in one kernel: its code cells executed in
order (tiny config, few steps), then all of them again, as a user re-running the notebook would."""

import contextlib
import io
import os
import sys

import nbformat
import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_demo.ipynb")


def code_cells() -> list[str]:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    cells = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    for source in cells:  # plain Python: the test runs it, and so does any Jupyter kernel
        assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()), source
    return cells


def replace_once(source: str, old: str, new: str) -> str:
    assert source.count(old) == 1, f"the notebook no longer has {old!r}"
    return source.replace(old, new)


def run_cells(cells: list[str], namespace: dict) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        for source in cells:
            exec(compile(source, NOTEBOOK, "exec"), namespace)
    return output.getvalue()


@pytest.fixture
def kernel_state(monkeypatch):
    """What the notebook changes in its kernel (cwd, sys.path) is put back afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("NATIVETOK_REPO_URL", raising=False)
    import matplotlib

    matplotlib.use("Agg")
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.slow
def test_every_cell_runs_twice_in_order_with_a_tiny_config(tmp_path, monkeypatch, kernel_state):
    config_file = conftest.write_config_file(tmp_path, "test_training.train_config", num_steps=4, log_every=2,
                                             checkpoint_every=4)
    workdir = str(tmp_path / "demo")
    cells = code_cells()
    training = next(i for i, source in enumerate(cells) if "nativetok_jax.main" in source)
    source = replace_once(cells[training], 'CONFIG = "configs/demo.py"', f"CONFIG = {config_file!r}")
    cells[training] = replace_once(source, 'WORKDIR = "/content/demo"', f"WORKDIR = {workdir!r}")
    monkeypatch.chdir(os.path.join(ROOT, "launch"))  # Jupyter started on the checkout's notebook
    namespace: dict = {}
    first = run_cells(cells, namespace)
    assert os.getcwd() == ROOT and f"code in {ROOT}" in first
    assert "pip install" not in first  # the package is importable: nothing to install
    assert "tokenizer " in first and "dB  (baseline)" in first and "token ids: (4, 8) int32" in first
    assert sorted(os.listdir(os.path.join(workdir, "exported"))) == ["config.json", "model.safetensors"]
    steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    second = run_cells(cells, namespace)  # the whole notebook again, in the same kernel
    assert os.getcwd() == ROOT and f"code in {ROOT}" in second
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == steps  # resumed, not retrained
    assert first.splitlines()[-1] == second.splitlines()[-1]  # the same export


@pytest.mark.slow
def test_the_install_cell_clones_once_and_lands_in_the_clone_each_time(tmp_path, monkeypatch, kernel_state):
    clone = str(tmp_path / "nativetok_jax")
    install = replace_once(code_cells()[0], 'CLONE_DIR = "/content/nativetok_jax"', f"CLONE_DIR = {clone!r}")
    monkeypatch.setenv("NATIVETOK_REPO_URL", ROOT)  # any git address; here the repository itself
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    namespace: dict = {}
    run_cells([install], namespace)
    assert os.getcwd() == clone and os.path.isfile(os.path.join(clone, "pyproject.toml"))
    marker = os.path.join(clone, "nativetok_jax", "marker")
    open(marker, "w").close()  # a second clone would replace the folder
    os.chdir(os.path.join(clone, "nativetok_jax"))  # where the old notebook's second %cd landed
    run_cells([install], namespace)
    assert os.getcwd() == clone and os.path.exists(marker)


@pytest.mark.slow
def test_without_a_checkout_or_url_the_install_cell_says_what_to_set(tmp_path, monkeypatch, kernel_state):
    install = replace_once(code_cells()[0], 'CLONE_DIR = "/content/nativetok_jax"',
                           f"CLONE_DIR = {str(tmp_path / 'absent')!r}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="set REPO_URL to your copy's git address"):
        run_cells([install], {})
