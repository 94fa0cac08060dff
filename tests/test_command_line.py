"""What every command shares: ``--help`` prints real help and exits 0, and the log is quiet by default
(no JAX backend probe, no orbax INFO/WARNING lines) unless ``--verbosity`` asks."""

import errno
import logging
import os
import subprocess
import sys

import pytest

from nativetok_jax import command as command_line
from nativetok_jax.training.diffusion_trainer import train_diffusion
from test_diffusion_training import tiny_dit_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> a phrase of its docstring or its options that --help must print
ENTRY_POINTS = {
    "nativetok_jax.main": "--workdir",
    "nativetok_jax.evaluate": "--workdir",
    "nativetok_jax.sample": "--workdir",
    "nativetok_jax.grain_thresholds": "--config",
    "nativetok_jax.experiments.token_order": "--workdir",
    "nativetok_jax.experiments.dynamic_grain": "--workdir",
    "nativetok_jax.experiments.grain_routing": "--workdir",
    "nativetok_jax.bench": "diffusion",
    "nativetok_jax.pretrained.export": "--workdir",
    "nativetok_jax.convert": "usage",
}


def run(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_help_exits_0_with_the_commands_help(module):
    result = run(module, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ENTRY_POINTS[module] in result.stdout and len(result.stdout.splitlines()) >= 5, result.stdout


def record(pathname: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("x", level, pathname, 1, "message", (), None)


def test_noise_is_orbax_below_error_and_jaxs_backend_probe():
    site = os.path.join("lib", "site-packages")
    orbax = os.path.join(site, "orbax", "checkpoint", "_src", "checkpoint_manager.py")
    probe = os.path.join(site, "jax", "_src", "xla_bridge.py")
    ours = os.path.join("nativetok_jax", "training", "progress.py")
    assert command_line.is_noise(record(orbax, logging.INFO)) and command_line.is_noise(record(orbax, logging.WARNING))
    assert not command_line.is_noise(record(orbax, logging.ERROR))
    assert command_line.is_noise(record(probe, logging.INFO)) and not command_line.is_noise(record(probe, logging.WARNING))
    assert not command_line.is_noise(record(ours, logging.INFO))
    full = record(orbax, logging.ERROR)
    full.exc_info = (OSError, OSError(errno.ENOSPC, "No space left on device"), None)
    assert command_line.is_noise(full)  # the command says it in one line


@pytest.mark.slow
def test_sample_log_is_quiet_unless_verbosity_asks(tmp_path):
    workdir = str(tmp_path / "dit")
    train_diffusion(tiny_dit_config(num_steps=2, checkpoint_every=2), workdir)
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # let JAX probe for a TPU
    flags = ("--workdir", workdir, "--num_samples", "2", "--num_steps", "2", "--sampler", "ddim")
    quiet = run("nativetok_jax.sample", *flags, "--out", str(tmp_path / "quiet"), env=env)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    lines = quiet.stderr.splitlines()
    # (A machine with libtpu installed but no TPU prints libtpu's own lines, outside the log.)
    assert not [line for line in lines if "orbax" in line or "xla_bridge.py" in line or "checkpoint_manager" in line]
    assert any("wrote 2 samples" in line for line in lines + quiet.stdout.splitlines())
    verbose = run("nativetok_jax.sample", *flags, "--out", str(tmp_path / "verbose"), "--verbosity=1", env=env)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "checkpoint_manager.py" in verbose.stderr  # orbax's lines are back on request
