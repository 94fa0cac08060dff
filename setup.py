"""The package list, which pyproject.toml cannot say: every ``nativetok_jax*`` package, plus the
repository's ``configs/`` shipped inside the wheel as ``nativetok_jax/configs`` (a checkout keeps
using ``--config configs/demo.py``; a plain ``pip install`` finds the same files under
``nativetok_jax.configs.__path__[0]``). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["nativetok_jax", "nativetok_jax.*"]) + ["nativetok_jax.configs"],
    package_dir={"nativetok_jax.configs": "configs"},
)
