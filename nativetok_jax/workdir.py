"""A run's directory: whether a config may resume in it, checked before anything is written.

A training run's directory (its ``--workdir``, and under it one directory per Hierarchical Native
Training stage, ``training.hnt.stage_directory``) holds the ``config.json`` the run was made
with and orbax checkpoints of that model. Rerunning the same command resumes; rerunning with a
model of other parameter shapes (``--config.model.quantizer.codebook_size=1024`` on a finished
run) cannot, and must not touch the run: were ``config.json`` rewritten, ``evaluate``, ``sample``
and ``Tokenizer.from_checkpoint`` could no longer load the intact checkpoints.

:func:`check_resume` compares the parameter shapes the requested config builds
(``nnx.eval_shape``, nothing allocated or compiled) with the shapes recorded in the newest
checkpoint's orbax metadata (nothing restored), in every directory the run would write, and
raises a one-line ``ConfigError`` naming the config fields that differ from the stored
``config.json`` and the parameters that differ. Settings that leave the shapes alone (steps,
learning rate, logging) may change between runs, except where they would move a step boundary
across the checkpoint's step (:func:`moved_boundary`: a quantiser warm-up or GAN start given as a
fraction of ``train.num_steps`` follows a changed step count, and the run would fit its codebook
again, or never, or switch its GAN off again). ``main`` calls it first, and
``checkpoints.write_config`` calls it before replacing a ``config.json``. :func:`check_loadable`
applies the same comparison to a run's own ``config.json``, for ``evaluate`` and ``sample``.

:func:`require_task` is what every command that reads a run asks first: what kind of run a
directory holds (its ``config.task``), refused in one line (``WrongRunError``) naming what the
directory is and what the command needs.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from nativetok_jax import checkpoints, sharding, storage, tasks
from nativetok_jax.config import (ConfigError, adversarial_start_step, quantizer_warmup_steps, stage_config,
                                  stage_directory, stage_list)
from nativetok_jax.errors import UserError

ARCHITECTURE_FIELDS = ("model", "generator", "grain_transformer")  # where the fields that shape parameters live
MAX_LISTED = 4


class WrongRunError(UserError):
    """A command was given the directory of a run of a kind it does not serve; the message names
    what the directory holds and what the command needs."""


def describe_run(config: ml_collections.ConfigDict) -> str:
    """``"an AR generator run (task 'generator')"``, ``"an HNT tokenizer run (2 stages, task 'tokenizer')"``:
    what a run's config makes of its directory (``tasks.Task.describe``)."""
    name = tasks.task_name(config)
    if name not in tasks.TASKS:
        return f"a {name!r} run (task {name!r})"
    return tasks.TASKS[name].describe(config)


def require_task(path: str | epath.PathLike, command: str, wanted: tuple[str, ...],
                 advice: str = "") -> ml_collections.ConfigDict:
    """The config of the run in ``path`` when its ``task`` is one of ``wanted`` (names in
    ``tasks.TASKS``).

    Raises:
      checkpoints.RunDirectoryError: ``path`` holds no run (no ``config.json``).
      WrongRunError: a run of another task: ``"sample: DIR is a tokenizer run (task 'tokenizer');
        sample needs a generator, DiT or D²iT run (task 'generator', 'diffusion' or 'd2it')"``,
        then ``advice``.
    """
    config = checkpoints.read_config(path)
    if tasks.task_name(config) in wanted:
        return config
    names = [tasks.TASKS[t].title for t in wanted]
    needs = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    quoted = [repr(t) for t in wanted]
    task_list = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    article = "an" if needs[0] in "AEIOU" else "a"
    raise WrongRunError(f"{command}: {path} is {describe_run(config)}; {command} needs {article} {needs} run "
                        f"(task {task_list}){'; ' + advice if advice else ''}")


def check_resume(config: ml_collections.ConfigDict, workdir: str | epath.PathLike) -> None:
    """Raises ``ConfigError`` when ``config`` cannot resume from the checkpoints under ``workdir``.

    Directories without a finished checkpoint accept any config. Tokenizer runs are checked
    stage by stage (each stage's config against its own directory); generator runs against the
    workdir, their vocabulary and token count taken from the tokenizer their config names.
    """
    for directory, run_config in run_directories(config, workdir):
        problem = checkpoint_mismatch(directory, run_config)
        if problem:
            raise ConfigError(f"{directory} holds checkpoints {problem}. Resume with the stored values, or give a new "
                              "--workdir")
        problem = moved_boundary(directory, run_config)
        if problem:
            raise ConfigError(problem)


# The step boundaries a resumed run must keep on the side of its checkpoint where they were:
# name, the resolved step (of a run's ``train``; None where the run has no such boundary), what
# crossing it does, and the flags that pin it.
BOUNDARIES = (
    ("quantiser warm-up", lambda t: quantizer_warmup_steps(t) if "quantizer_warmup_steps" in t else None,
     ("fit its codebook again, after {updates} quantised", "never fit its codebook"),
     "--config.train.quantizer_warmup_steps={step} --config.train.quantizer_warmup_fraction=0"),
    ("GAN start", lambda t: adversarial_start_step(t) if t.get("losses", {}).get("adversarial_weight", 0) > 0 else None,
     ("switch its GAN off again, after {updates} adversarial", "start its GAN at once"),
     "--config.train.losses.adversarial_start_step={step} --config.train.losses.adversarial_start_fraction=0"),
)


def moved_boundary(directory: epath.Path, config: ml_collections.ConfigDict) -> str | None:
    """Why ``config`` cannot resume the checkpoints in ``directory`` at the step boundaries its
    ``config.json`` had (one line), or ``None``.

    A boundary at update ``b`` (0-based: the quantiser's codebook is fitted before update ``b``,
    the GAN terms start at update ``b``) has happened in a checkpoint of step ``s`` (``s`` updates
    made) when ``s > b``. Resuming with settings that put it on the other side of ``s`` would redo
    it or skip it: ``--config.train.num_steps=3200`` then the same command without it moves a
    warm-up of a quarter of the steps from 800 to 3200, and the run, resumed at 3200, fits its
    codebook again from the encoder's outputs. Moving it on the same side of ``s`` is allowed.
    """
    saved = newest_saved_step(directory)
    if saved is None or not (directory / checkpoints.CONFIG_FILE).exists():
        return None
    stored = checkpoints.read_config(str(directory))
    for name, resolve, (redo, skip), pin in BOUNDARIES:
        try:
            old, new = resolve(stored.train), resolve(config.train)
        except (ConfigError, AttributeError, KeyError):  # a stored config of an older layout
            continue
        if old is None or new is None or (saved > old) == (saved > new):
            continue
        updates = saved - old
        effect = redo.format(updates=updates) + (" update" if updates == 1 else " updates") if saved > old else skip
        return (f"{directory} holds checkpoints at step {saved}, {'after' if saved > old else 'before'} its {name} at "
                f"step {old}; these settings put it at step {new} (train.num_steps {stored.train.num_steps} -> "
                f"{config.train.num_steps}), so the resumed run would {effect}. Keep it with {pin.format(step=old)}, "
                "or give a new --workdir")
    return None


def newest_saved_step(directory: str | epath.PathLike) -> int | None:
    """The newest finished checkpoint's step in ``directory``, or ``None`` when it has none."""
    path = epath.Path(checkpoints.checkpoint_directory(str(directory)))
    steps = ocp.utils.checkpoint_steps(path) if path.is_dir() else []
    return max(steps) if steps else None


def check_loadable(path: str | epath.PathLike) -> None:
    """Raises ``ConfigError`` when a run's ``config.json`` (of ``path`` or its final stage) does not
    describe its own checkpoints, e.g. a workdir whose config an older version overwrote: one
    line instead of a shape error deep inside the restore."""
    stage = checkpoints.final_stage_directory(str(path))
    problem = checkpoint_mismatch(epath.Path(stage), checkpoints.read_config(stage))
    if problem:
        raise ConfigError(f"{stage}/{checkpoints.CONFIG_FILE} does not describe the checkpoints there, which are "
                          f"{problem}. Restore the config the run was trained with")


def checkpoint_mismatch(directory: epath.Path, config: ml_collections.ConfigDict) -> str | None:
    """``"(step 2) of another model: <fields>; parameters differ: <parameters>"``, or ``None`` when
    ``directory`` has no finished checkpoint or its parameters have the shapes ``config`` builds."""
    saved = saved_parameter_shapes(directory)
    if saved is None:
        return None
    step, shapes = saved
    problems = sharding.mismatches(requested_parameter_shapes(config, shapes), shapes)
    if not problems:
        return None
    return (f"(step {step}) of another model: {changed_fields(directory, config)}; parameters differ: "
            f"{sharding.summarize(problems, 3)}")


def run_directories(config: ml_collections.ConfigDict,
                    workdir: str | epath.PathLike) -> list[tuple[epath.Path, ml_collections.ConfigDict]]:
    """Every ``(directory, config)`` a run of ``config`` in ``workdir`` writes checkpoints to."""
    workdir = epath.Path(workdir)
    if not tasks.of(config).staged or not config.hnt.stages:  # one stage: the workdir itself
        return [(workdir, config)]
    return [(epath.Path(stage_directory(str(workdir), stage, True)), stage_config(config, stage))
            for stage in stage_list(config)]


def saved_parameter_shapes(directory: str | epath.PathLike) -> tuple[int, dict[str, Any]] | None:
    """``(step, {"a/b": shape-like})`` of the newest finished checkpoint's parameters, from orbax
    metadata alone; ``None`` when the directory has none."""
    step = newest_saved_step(directory)  # finished saves only: a killed one leaves a tmp directory
    if step is None:
        return None
    path = epath.Path(checkpoints.checkpoint_directory(str(directory)))
    metadata = ocp.PyTreeCheckpointHandler().metadata(path / str(step) / "state")
    return step, traverse_util.flatten_dict(dict(metadata["params"]), sep="/")


def requested_parameter_shapes(config: ml_collections.ConfigDict, saved: dict[str, Any]) -> dict[str, Any]:
    """``{"a/b": ShapeDtypeStruct}`` of the model ``config`` builds (abstract: nothing allocated);
    a config that cannot build one is the ``ConfigError`` its validation raises."""
    abstract = tasks.of(config).abstract_model(config, saved)
    # List layers (the DVAE's) have integer keys; orbax's metadata has them as strings.
    flat = traverse_util.flatten_dict(sharding.params_of(abstract))
    return {"/".join(map(str, key)): value for key, value in flat.items()}


def changed_fields(directory: epath.Path, config: ml_collections.ConfigDict) -> str:
    """``"config.model.quantizer.codebook_size is 1024, config.json has 64"`` for the architecture
    fields that differ from the stored ``config.json`` (or why they cannot be listed)."""
    if not (directory / checkpoints.CONFIG_FILE).exists():
        return f"no {checkpoints.CONFIG_FILE} to compare with"
    stored = _flat(checkpoints.read_config(str(directory)))
    requested = _flat(config)
    differing = [key for key in sorted(set(stored) | set(requested))
                 if key.split(".")[0] in ARCHITECTURE_FIELDS and stored.get(key) != requested.get(key)]
    if not differing:
        return f"its {checkpoints.CONFIG_FILE} has the requested model fields, the checkpoints do not"
    listed = [f"config.{key} is {requested.get(key)!r}, {checkpoints.CONFIG_FILE} has {stored.get(key)!r}"
              for key in differing[:MAX_LISTED]]
    more = f" and {len(differing) - MAX_LISTED} more fields" if len(differing) > MAX_LISTED else ""
    return ", ".join(listed) + more


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {key: list(value) if isinstance(value, tuple) else value for key, value in flat.items()}


# ------------------------------------------------------------------------------ upstream models

UPSTREAM_FILE = "upstream.json"


def record_upstream(workdir: str | epath.PathLike, upstream: dict[str, Any], *, is_main: bool = True) -> None:
    """Records what a run trains on that lives outside it (``upstream``: ``{"model.autoencoder.weights
    sha256": "…", "dvae step": 5000, "dvae latent_scale": 0.9}``) in ``WORKDIR/upstream.json`` at its
    first start; a resumed run whose upstream changed since is refused (:func:`check_upstream`).

    Raises:
      ConfigError: ``upstream`` differs from what the run recorded (one line naming each field).
    """
    check_upstream(workdir, upstream, "resuming")
    target = storage.path(workdir) / UPSTREAM_FILE
    if is_main and not target.exists():
        storage.write_json(target, upstream)


def check_upstream(workdir: str | epath.PathLike, current: dict[str, Any], action: str) -> None:
    """Raises ``ConfigError`` when a field of ``WORKDIR/upstream.json`` differs from ``current``'s:
    ``action`` (resuming, sampling) would silently use another upstream model than the run
    trained with (a VAE re-converted at the same path decodes the run's latents wrongly; a DVAE
    trained further encodes and scales its latents otherwise). Runs without the file (older ones)
    and fields ``current`` does not give are not checked."""
    source = storage.path(workdir) / UPSTREAM_FILE
    if not source.exists():
        return
    recorded = storage.read_json(source)
    changed = [f"{name}: {recorded[name]!r} when it trained, {current[name]!r} now" for name in sorted(recorded)
               if name in current and current[name] != recorded[name]]
    if changed:
        raise ConfigError(f"{storage.path(workdir)} was trained on other upstream models ({'; '.join(changed)}); "
                          f"{action} would silently use the new ones: restore what it trained with, or train a new "
                          "run")


def write_config(directory: storage.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes ``config`` beside the checkpoints of ``directory`` (``checkpoints.write_config``).

    Raises ``ConfigError`` instead of replacing the config of a run whose checkpoints hold
    parameters of other shapes (:func:`check_resume`): they could no longer be loaded.
    """
    check_resume(config, directory)
    checkpoints.write_config(directory, config)
