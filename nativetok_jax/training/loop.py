"""The training loop every trainer runs: :func:`run`.

A trainer (the tokenizer's, the generator's, and every one added later) builds its state with
``state.build_state``, states its objective (``step.Objective``: a loss, and how extra state
parts such as a discriminator are updated), and hands both to :func:`run` in a :class:`Task`
with its batch iterator, the batch shardings and an evaluation callback. The loop then, in one
place for all of them:

- resumes from the newest checkpoint in ``workdir``, else grows the state (``Task.grow``, e.g.
  from the previous HNT stage), else starts fresh;
- runs the one jitted, donated step under the mesh *and* the logical-axis rules;
- checks that the loss and parameters are finite before every log and every save;
- logs (``train.log_every``), evaluates (``train.eval_every`` and at the end; every number the
  evaluation returns is logged as ``eval/<name>``) and checkpoints
  (``train.checkpoint_every`` and at the end) on their schedules, with a progress report
  (steps/s, ETA) and an optional profiler window (``train.profile_steps`` from
  ``train.profile_first_step``);
- asks at every step whether the run is preempted or interrupted (``guards.Preemption``: JAX's
  preemption sync point, agreed across hosts, or a SIGTERM or Ctrl-C flag) and then saves and
  raises ``Preempted``.

Example (a new model adds a loss and a config, not a loop)::

    built = build_state(lambda rngs: MyModel(config.model, rngs=rngs), train=config.train,
                        mesh=mesh, rules=rules)

    def loss(params, batch, context):  # context: step, key, extra parts, constants
        model = nnx.merge(built.graphdef, params)
        error = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
        return error, ({"mse": error}, None)

    def evaluate(state, step, outputs):  # its numbers are logged as eval/mse ...
        outputs.grid("samples", step, rows_of_uint8_images)
        return {"mse": held_out_mse(loop.evaluation_params(state))}

    result = loop.run(loop.Task(
        built, Objective(loss), batches=grain_iterator,
        batch_shardings=batch_shardings(mesh, {"x": (256, 32), "y": (256, 1)}), evaluate=evaluate,
    ), config.train, workdir)
    loop.write_summary(workdir, dict(result.metrics, step=result.step))  # eval.json

Around the evaluations: :func:`evaluation_params` (the EMA when kept), :func:`per_example` (a
jitted function over held-out examples in padded batches under the mesh and rules) and
:func:`write_summary` (the run's ``eval.json``). Only process 0 writes events and images; every process takes part in checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from nativetok_jax import checkpoints, storage
from nativetok_jax.evaluation.grids import save_grid
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.training import tensorboard
from nativetok_jax.training.guards import Preempted, Preemption, check_finite
from nativetok_jax.training.profiler import ProfileWindow
from nativetok_jax.training.progress import ReportProgress
from nativetok_jax.training.state import BuiltState, TrainState
from nativetok_jax.training.step import Objective, make_train_step


def create_writer(workdir: epath.PathLike, is_main: bool) -> tensorboard.MetricWriter:
    """The run's TensorBoard (and log) writer: the one place a writer is made (clu's with
    TensorFlow installed, tensorboardX's without)."""
    return tensorboard.create_writer(workdir, just_logging=not is_main)


class Outputs:
    """What an evaluation callback writes through: scalars and PNG grids (process 0 writes)."""

    def __init__(self, workdir: epath.Path, writer: tensorboard.MetricWriter):
        self.workdir, self.writer = workdir, writer

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.writer.write_scalars(step, values)

    def grid(self, name: str, step: int, rows: list[np.ndarray], upscale: int = 1) -> None:
        """Writes ``images/<name>_<step>.png`` (rows of uint8 ``[N, H, W, 3]``) and the same
        image to TensorBoard."""
        if jax.process_index() != 0:
            return
        image = save_grid(str(self._image_path(name, step)), rows, upscale=upscale)
        self.writer.write_images(step, {name: image[None]})

    def plot(self, name: str, step: int, draw: Callable[[epath.Path], Any]) -> None:
        """Calls ``draw(path)`` (e.g. a function of :mod:`nativetok_jax.evaluation.plots`) with
        ``images/<name>_<step>.png``, beside the grids."""
        if jax.process_index() == 0:
            draw(self._image_path(name, step))

    def _image_path(self, name: str, step: int) -> epath.Path:
        directory = self.workdir / "images"
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{name}_{step:07d}.png"


@dataclasses.dataclass
class Task:
    """What a trainer supplies to :func:`run`.

    Attributes:
      built: the fresh state from ``build_state`` (with its extra parts added).
      objective: the loss and extra-part update (``step.Objective``).
      batches: this process's share of every global batch (numpy dicts); a grain iterator, so
        checkpoints hold its position and a resumed run sees the very batches it would have.
      batch_shardings: the global batch arrays' shardings, by name (``step.batch_shardings``).
      evaluate: ``(state, step, outputs) -> metrics``: held-out evaluation and grids; the loop
        logs the numbers among the metrics as ``eval/<name>``.
      grow: ``state -> state`` used when there is no checkpoint to resume (HNT growth).
      before_step: ``(state, step) -> state`` run before each step (the codebook fit).
      log_scalars: extra scalars logged with the step's metrics.
      name: for log lines.
    """

    built: BuiltState
    objective: Objective
    batches: Iterator[dict[str, np.ndarray]]
    batch_shardings: dict[str, jax.sharding.NamedSharding]
    evaluate: Callable[[TrainState, int, Outputs], dict[str, Any]]
    grow: Callable[[TrainState], TrainState] | None = None
    before_step: Callable[[TrainState, int], TrainState] | None = None
    log_scalars: Callable[[], dict[str, float]] | None = None
    name: str = "training"


@dataclasses.dataclass
class Result:
    state: TrainState
    step: int
    metrics: dict[str, Any]  # the last evaluation's


def evaluation_params(state: TrainState) -> Any:
    """The weights every evaluation uses: the EMA when the run keeps one (``train.ema_decay > 0``),
    else the parameters."""
    return state["ema"] if state["ema"] else state["params"]


def scalars_of(metrics: dict[str, Any]) -> dict[str, float]:
    """``eval/<name>`` for every finite number of an evaluation's result (lists, dicts, strings and
    ``None`` are left to ``eval.json``)."""
    return {f"eval/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)}


def per_example(fn: Callable[..., Any], examples: dict[str, np.ndarray], batch_size: int, mesh: jax.sharding.Mesh,
                rules: Any, *args: Any) -> Any:
    """``fn(batch, indices, *args)`` over every example, ``batch_size`` at a time, under the mesh and
    the axis rules; returns its per-example results (a pytree of ``[N, ...]`` numpy arrays).

    ``examples`` maps names to ``[N, ...]`` arrays; ``indices`` (int32 ``[b]``) are the examples'
    positions, so ``fn`` can derive per-example randomness that does not depend on the batching. The
    last batch is padded by repeating its examples (one compiled shape) and the padding dropped.
    ``fn``'s results must be replicated (``out_shardings``) or fully addressable on every host.
    """
    n = len(next(iter(examples.values())))
    b = min(batch_size, n)
    parts = []
    with jax.set_mesh(mesh), axis_rules(rules):
        for start in range(0, n, b):
            index = np.resize(np.arange(start, min(start + b, n)), b)  # the last batch padded
            out = fn({name: value[index] for name, value in examples.items()}, index.astype(np.int32), *args)
            parts.append(jax.tree.map(lambda v, k=min(b, n - start): np.asarray(v)[:k], out))
    return jax.tree.map(lambda *v: np.concatenate(v), *parts)


def write_summary(workdir: epath.PathLike, summary: dict[str, Any]) -> None:
    """Writes the run's final evaluation to ``<workdir>/eval.json`` (process 0; indented JSON): the
    one writer of every trainer's summary."""
    if jax.process_index() == 0:
        storage.write_json(epath.Path(workdir) / "eval.json", summary)


def run(task: Task, train: Any, workdir: epath.PathLike) -> Result:
    """Trains ``task`` to ``train.num_steps`` in ``workdir`` (resuming, growing or fresh).

    ``train`` holds ``num_steps, log_every, eval_every, checkpoint_every, keep_checkpoints, seed,
    ema_decay`` and optionally ``profile_steps, profile_first_step``. Raises ``Preempted`` after
    saving when the run is preempted, ``NonFiniteLossError`` before saving a non-finite state.
    """
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    built = task.built
    store = checkpoints.Checkpoints(checkpoints.checkpoint_directory(workdir), train.keep_checkpoints)
    latest = store.latest_step()
    state = built.state
    if latest is not None:
        state = store.restore(latest, built.abstract(), task.batches)
        logging.info("%s: resumed from %s at step %d", task.name, store.directory, latest)
    elif task.grow is not None:
        state = task.grow(state)
    built.state = None  # the loop owns (and donates) the state from here on
    step = int(jax.device_get(state["step"]))

    train_step = make_train_step(task.objective, built, task.batch_shardings, seed=train.seed,
                                 ema_decay=train.ema_decay)
    writer = create_writer(workdir, is_main)
    outputs = Outputs(workdir, writer)
    progress = ReportProgress(num_train_steps=train.num_steps, writer=writer, every_steps=train.log_every)
    profile = None
    if train.get("profile_steps", 0) and is_main:
        profile = ProfileWindow(workdir, num_steps=train.profile_steps,
                                first_step=train.get("profile_first_step", 10))
        profile(step)  # the window is told of each finished step: this one opens a window from step 0
    preemption = Preemption()
    last_saved = latest
    metrics: dict[str, Any] = {}
    try:
        if latest is not None and latest < train.num_steps and latest % train.eval_every == 0:
            # A run stopped (preempted) at an evaluation step saved without evaluating, to save in
            # time: the evaluation is made up here, so the resumed run's record has every one an
            # uninterrupted run has (a run killed after an evaluation repeats it, same figures).
            with progress.timed("eval"):
                metrics = task.evaluate(state, step, outputs)
            outputs.scalars(step, scalars_of(metrics))
        while step < train.num_steps:
            if task.before_step is not None:
                state = task.before_step(state, step)
            batch = {name: jax.make_array_from_process_local_data(task.batch_shardings[name], value)
                     for name, value in next(task.batches).items() if name in task.batch_shardings}
            state, step_metrics = train_step(state, batch)
            step += 1
            progress(step)
            if profile is not None:
                profile(step)
            last = step == train.num_steps
            stop = preemption.reached(step)
            log = step % train.log_every == 0 or last
            save = step % train.checkpoint_every == 0 or last or stop
            if log or save:  # every logged or saved state is checked first
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                check_finite(values, step, store.directory, last_saved)
            if log:
                writer.write_scalars(step, dict(values, **(task.log_scalars() if task.log_scalars else {})))
            if not stop and (step % train.eval_every == 0 or last):
                with progress.timed("eval"):
                    metrics = task.evaluate(state, step, outputs)
                outputs.scalars(step, scalars_of(metrics))
            if save:
                store.save(step, state, task.batches)
                last_saved = step
            if stop:
                raise Preempted(f"{preemption.reason} at step {step}; checkpoint saved in {store.directory}")
        if not metrics:  # the run was already complete: evaluate what it left
            metrics = task.evaluate(state, step, outputs)
            outputs.scalars(step, scalars_of(metrics))
    finally:
        preemption.restore()
        if profile is not None:
            profile.close()
        # Closed here, not by tensorboardX's exit hook: Python 3.12 cannot start the writer's
        # queue thread at interpreter shutdown (a traceback after a run's last line).
        writer.close()
        store.close()
    return Result(state, step, metrics)
