"""Every ```python snippet of README.md and docs/*.md runs as written, from a checkout's root.

A snippet that opens a run the README's commands made (``workdirs/NAME``) gets a tiny stand-in
run of the same kind at that path (``RUNS``); a snippet naming a run with no stand-in fails,
saying which, so a new snippet cannot go untested."""

import glob
import os
import re

import pytest

from test_dvae_training import dvae_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def snippets() -> list[tuple[str, str]]:
    """``(id, code)`` for every python fence, ``id`` being ``FILE:LINE`` of the fence."""
    found = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        with open(path) as f:
            text = f.read()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{os.path.relpath(path, ROOT)}:{line}", match.group(1)))
    return found


def dvae_run(workdir: str) -> None:
    from nativetok_jax.training.dvae_trainer import train_dvae

    train_dvae(dvae_train_config(num_steps=2, checkpoint_every=2, latent_scale_batches=1), workdir)


def exported_dit(directory: str) -> None:
    from test_diffusion_training import tiny_dit_config

    from nativetok_jax.pretrained.export import export_run
    from nativetok_jax.training.diffusion_trainer import train_diffusion

    run = directory + "_run"
    train_diffusion(tiny_dit_config(num_steps=1, checkpoint_every=1), run)
    export_run(run, directory)


# workdirs/NAME -> a function that trains a tiny run of that kind into a directory
RUNS = {"dvae_demo": dvae_run}
# exported/NAME -> a function that writes a tiny exported model of that kind (pretrained.export)
EXPORTS = {"dit_demo": exported_dit}


def test_the_docs_have_snippets():
    assert len(snippets()) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("label,code", snippets(), ids=[label for label, _ in snippets()])
def test_snippet_runs_as_written(label, code, tmp_path, monkeypatch):
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    for name in sorted(set(re.findall(r"workdirs/([A-Za-z0-9_]+)", code))):
        assert name in RUNS, f"{label} opens workdirs/{name}: add a tiny run of its kind to RUNS"
        RUNS[name](str(tmp_path / "workdirs" / name))
    for name in sorted(set(re.findall(r"exported/([A-Za-z0-9_]+)", code))):
        assert name in EXPORTS, f"{label} opens exported/{name}: add a tiny export of its kind to EXPORTS"
        EXPORTS[name](str(tmp_path / "exported" / name))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, label, "exec"), {"__name__": "__snippet__"})  # noqa: S102 - the docs' own code
