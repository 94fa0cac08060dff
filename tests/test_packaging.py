"""Packaging: compatible ranges in pyproject.toml, the tested set in requirements.txt (which every
install command uses as constraints), the extras, and what the wheel carries."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from nativetok_jax.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


# The tested sets: today's on Python 3.11, and the current JAX set on Python 3.12.
LOCKS = {"requirements.txt": "3.11", "requirements-py312.txt": "3.12"}


def locked(lock: str = "requirements.txt") -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, lock)) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, version = line.partition("==")
                assert version and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"not an exact pin: {line!r}"
                pins[canonicalize_name(name)] = version
    return pins


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_dependencies_are_ranges_and_the_lock_satisfies_them(lock):
    project, pins = pyproject(), locked(lock)
    assert project["requires-python"] == ">=3.11"  # jax 0.10, numpy 2.4 and pillow 13 need 3.11
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    requirements += [Requirement(r) for r in project["optional-dependencies"]["tensorflow"]]
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name == "nativetok-jax":
            continue  # dev includes the [tensorflow] extra
        if requirement.marker and not requirement.marker.evaluate({"sys_platform": "linux"}):
            continue
        assert name in pins, f"{name} is not in requirements.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (str(requirement), pins[name])
    for requirement in project["dependencies"]:
        assert "==" not in requirement, f"an exact pin in the wheel's requirements: {requirement}"
    # PyPI's torch 2.13.0 and the CPU build (2.13.0+cpu) both match; never a newer release.
    assert pins["torch"] == "2.13.0" and "torch==2.13.0" in project["optional-dependencies"]["dev"]


def test_accelerator_and_tensorflow_extras():
    extras = pyproject()["optional-dependencies"]
    assert extras["cuda12"] == ["jax[cuda12]>=0.10.2,<0.13"] and extras["tpu"] == ["jax[tpu]>=0.10.2,<0.13"]
    assert all("tensorflow" in r for r in extras["tensorflow"])
    assert not any("tensorflow" in r and "datasets" not in r for r in pyproject()["dependencies"])


def test_the_two_sets_are_todays_and_the_current_jax():
    """Python 3.11 keeps the tested jax 0.10 set; Python 3.12 gets jax 0.12 (which needs 3.12)."""
    old, new = locked("requirements.txt"), locked("requirements-py312.txt")
    assert set(old) == set(new)  # the same packages, at other versions
    assert old["jax"].startswith("0.10.") and new["jax"].startswith("0.12.") and new["jaxlib"] == new["jax"]
    assert new["flax"] == "0.12.12"


def test_every_install_command_uses_a_tested_set():
    commands = []
    for path in ("README.md", "launch/multi_gpu.sh", "launch/tpu_pod.sh", "docs/install.md"):
        with open(os.path.join(ROOT, path)) as f:
            commands += [line for line in f if re.search(r"pip install (-q )?-e ", line)]
    assert len(commands) >= 6
    for line in commands:
        assert re.search(r"-c requirements(-py312)?\.txt", line), line


def test_license_and_typing_marker():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert pyproject()["license"] == {"text": "Apache-2.0"}
    assert os.path.isfile(os.path.join(ROOT, "nativetok_jax", "py.typed"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    ROOT], check=True, capture_output=True, timeout=300)
    (name,) = os.listdir(out)
    return str(out / name)


@pytest.mark.slow
def test_the_wheel_carries_the_configs_license_and_py_typed(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path)
    # Every file of configs/, the data files the configs name beside themselves (the DVAE demo's
    # thresholds .json, missing from the wheel until 2026-12-07) as well as the .py files.
    configs = sorted(name for name in os.listdir(os.path.join(ROOT, "configs"))
                     if os.path.isfile(os.path.join(ROOT, "configs", name)) and not name.endswith(".pyc"))
    assert any(name.endswith(".json") for name in configs)
    assert {f"nativetok_jax/configs/{name}" for name in configs} <= names
    assert "nativetok_jax/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    # Installed configs load their siblings by relative path, as in a checkout.
    config = load_config_file(str(tmp_path / "nativetok_jax" / "configs" / "hnt_demo.py"))
    assert config.model.num_tokens == load_config_file(os.path.join(ROOT, "configs", "hnt_demo.py")).model.num_tokens
    dvae = load_config_file(str(tmp_path / "nativetok_jax" / "configs" / "dvae_demo.py"))
    assert os.path.isfile(dvae.model.grain.thresholds)
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Python: >=3.11" in metadata and "Provides-Extra: cuda12" in metadata


@pytest.mark.slow
def test_an_editable_install_imports_the_configs(tmp_path):
    """The README's ``import nativetok_jax.configs`` recipe in ``pip install -e .`` (setuptools'
    editable finder maps only regular packages below a package: configs/ needs its __init__.py)."""
    import sysconfig
    import venv

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "deps.pth"), "w") as f:  # this interpreter's packages: no downloads
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    # A copy of the checkout, so that the editable install's finder does not touch ROOT's.
    source = tmp_path / "checkout"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "*.egg-info", "build", "workdirs", "__pycache__"))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(source)],
                   check=True, capture_output=True, timeout=600)
    result = subprocess.run([python, "-c", "import nativetok_jax.configs as c; print(c.__path__[0])"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.isfile(os.path.join(result.stdout.strip(), "demo.py"))
