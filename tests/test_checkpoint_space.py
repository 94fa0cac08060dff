"""A full disk during a checkpoint save: one line naming the directory and the intact checkpoint
(not orbax's tracebacks), the half-written checkpoint removed, and the rerun resumes. The device
filling up is simulated: a write inside orbax's save raises ENOSPC."""

import errno
import os
import subprocess
import sys
import textwrap

import grain
import pytest

import conftest
from nativetok_jax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `python -m nativetok_jax.main ARGS` with the second checkpoint save failing as on a full disk.
FULL_DISK = textwrap.dedent("""
    import errno, runpy, sys
    import grain

    original = grain.checkpoint.CheckpointHandler.save
    calls = []

    def save(self, directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return original(self, directory, *args, **kwargs)

    grain.checkpoint.CheckpointHandler.save = save
    sys.argv = ["nativetok_jax.main", *sys.argv[1:]]
    runpy.run_module("nativetok_jax.main", run_name="__main__")
""")


@pytest.mark.slow
def test_no_space_is_one_line_naming_the_intact_checkpoint_and_the_rerun_resumes(tmp_path):
    config_file = conftest.write_config_file(tmp_path, "test_diffusion_training.tiny_dit_config", num_steps=4,
                                             checkpoint_every=2)
    workdir = str(tmp_path / "run")
    args = ["--config", config_file, "--workdir", workdir]
    full = subprocess.run([sys.executable, "-c", FULL_DISK, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    directory = os.path.join(workdir, "checkpoints")
    assert full.returncode == 1, full.stderr[-3000:]
    assert full.stderr.splitlines()[-1] == (f"error: no space left on {directory} while saving checkpoint 4; "
                                            "checkpoint 2 is intact; free space and rerun to resume")
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    assert sorted(os.listdir(directory)) == ["2"]  # nothing half-written left behind
    again = subprocess.run([sys.executable, "-m", "nativetok_jax.main", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and checkpoints.load_params(workdir)[1] == 4


def test_other_save_errors_keep_their_traceback(tmp_path, monkeypatch):
    def fail(self, directory, *args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied", str(directory))

    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", fail)
    assert not checkpoints.is_no_space(OSError(errno.EACCES, "Permission denied"))
    assert checkpoints.is_no_space(ExceptionGroup("save", [ValueError("x"), OSError(errno.ENOSPC, "full")]))
    assert checkpoints.is_no_space(RuntimeError("write failed: [errno 28] No space left on device"))
    store = checkpoints.Checkpoints(str(tmp_path / "checkpoints"), keep=2)
    try:
        import jax.numpy as jnp

        with pytest.raises(OSError, match="Permission denied") as error:
            store.save(1, {"x": jnp.zeros(3)}, iter(grain.MapDataset.range(4).to_iter_dataset()))
        assert not isinstance(error.value, checkpoints.NoSpaceError)
    finally:
        store.close()
