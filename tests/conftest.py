"""Test set-up: 8 fake CPU devices (so every sharding path runs) and small model configs."""

import os
import shutil
import subprocess
import sys
import tempfile


def xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA accepts ``flag`` (an unknown flag in XLA_FLAGS is fatal at start-up,
    so a child process tries it)."""
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                           timeout=300)
    return probe.returncode == 0


# 8 fake devices exercise every sharding path; optimisation level 0 makes XLA's CPU compiles
# (random-number initialisers above all) several times faster, which is most of the suite's time,
# and the older loop emitters compile the tiny test models' fusions a third faster again, where the
# XLA still has them (jaxlib 0.10 does; 0.12 no longer knows the flag).
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _flag.split("=")[0] not in _flags:
        _flags += " " + _flag
_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
if "--xla_cpu_use_fusion_emitters" not in _flags and os.environ.get("NATIVETOK_XLA_EMITTERS_PROBED") != "unknown":
    if xla_knows(_EMITTERS):
        _flags += " " + _EMITTERS
    else:  # pytest-xdist workers and the tests' own processes need not ask again
        os.environ["NATIVETOK_XLA_EMITTERS_PROBED"] = "unknown"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache per test session, inherited by the training processes the tests start:
# the same tiny programs are compiled by many tests and by every resumed or parallel run.
# pytest-xdist workers inherit the directory from the controller, which removes it at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nativetok_xla_cache_")
    _OWNED_CACHE_DIR = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _OWNED_CACHE_DIR = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import traverse_util  # noqa: E402

from nativetok_jax import checkpoints  # noqa: E402

from nativetok_jax.config import base_config  # noqa: E402


TESTS = os.path.dirname(os.path.abspath(__file__))


def write_config_file(directory, factory: str, **kwargs) -> str:
    """A config file for the command lines whose ``get_config()`` returns ``factory(**kwargs)``,
    ``factory`` being a test helper such as ``"conftest.tiny_config"``."""
    module, name = factory.rsplit(".", 1)
    path = os.path.join(str(directory), f"{name}.py")
    with open(path, "w") as f:
        f.write(f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom {module} import {name}\n\n"
                f"def get_config():\n    return {name}(**{kwargs!r})\n")
    return path


def flat(tree) -> dict:
    """``{"a/0/b": array}``: list layers' keys as strings, whether restored (strings) or built (ints)."""
    return {"/".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def assert_same_checkpoint(expected_dir: str, got_dir: str, step: int, label: str = "") -> None:
    """The latest checkpoints of two workdirs (a resumed run's and the uninterrupted one's) are both
    at ``step`` and hold the same parameters, raw and EMA, bit for bit."""
    for use_ema in (False, True):
        expected, expected_step = checkpoints.load_params(expected_dir, use_ema=use_ema)
        got, got_step = checkpoints.load_params(got_dir, use_ema=use_ema)
        assert expected_step == got_step == step, (label, expected_step, got_step)
        expected, got = flat(expected), flat(got)
        assert set(got) == set(expected), label
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{label}: {key}" if label else key)


def tiny_config(kind: str = "nativetok", num_tokens: int = 8) -> ml_collections.ConfigDict:
    """A model small enough to compile and run in seconds, with every part present."""
    config = base_config()
    m = config.model
    m.kind = kind
    m.image_size = 16
    m.patch_size = 4
    m.num_tokens = num_tokens
    m.encoder.update(width=32, depth=2, num_heads=4)
    m.experts.update(width=16, depth=2, num_heads=2)
    m.quantizer.update(codebook_size=64, token_dim=4)
    m.decoder.update(width=32, depth=2, num_heads=4)
    m.decoder.proxy_codebook_size = 32
    return config


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
    assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS)"


def pytest_sessionfinish(session, exitstatus):
    if _OWNED_CACHE_DIR:
        shutil.rmtree(_OWNED_CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _absl_log_level():
    """Entry points called in-process parse absl's flags, and parsing ``--verbosity`` (default -1,
    WARNING) sets the absl logger's level: restore it, so that a later test's ``caplog`` still
    sees INFO lines."""
    from absl import logging as absl_logging

    logger = absl_logging.get_absl_logger()
    level = logger.level
    yield
    logger.setLevel(level)
