"""``python -m nativetok_jax.bench diffusion``: DiT's and D²iT's train steps and samplers.

For each config (default: DiT-B/2 at 256 px on 32 x 32 x 4 latents, and the pixel-space demo; a
``task="d2it"`` config such as ``configs/d2it.py:B`` measures D²iT): the real train step of the
config's trainer on random latents (DiT: ``diffusion_objective`` on ``build_state``'s state: a
random flip, a posterior draw, label dropout, DiT's loss, AdamW and the EMA; D²iT:
``d2it_objective``, the same plus multi-grained noise, the dynamic grain loss and the grain
transformer's loss, on random grain maps with half the regions fine):
step time, images per second, the process's CPU seconds per step (what a shared machine cannot
disturb much), model FLOPs per step (XLA's cost analysis of the step with the layer scan
unrolled) and MFU against the FLOP/s of a large matrix product timed in the same run. Then the
samplers' images per second: DDPM-250 and DDIM-50, each without guidance and with guidance 4.0
(a doubled batch); D²iT's draw the latent given random grain maps (the grain transformer's few
MaskGIT steps on a 16 x 16 map are not included).

A sampler's cost is linear in its steps (one network call each; guidance doubles the batch), so
where a full run would take minutes (DiT-B/2 on a CPU: about a second per image and step) the
sampler is timed over ``--sampler_steps`` respaced steps and its images per second given for the
full step count, ``timed_steps`` saying so in the JSON. The defaults (batch 2 for DiT-B/2, 4 timed
sampler steps for it, all steps for the demo) keep the whole benchmark to a few minutes on a 2-core
CPU; on an accelerator raise ``--batch_sizes`` and set ``--sampler_steps 0`` (all steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nativetok_jax import sharding, storage, tasks
from nativetok_jax.bench.model import write_json
from nativetok_jax.bench.train import matmul_flops_per_second
from nativetok_jax.config import ConfigError, d2it_latent_shape, dit_latent_shape, load_config_file, validate_d2it, validate_dit
from nativetok_jax.diffusion.gaussian import build_diffusion
from nativetok_jax.diffusion.respacing import space_timesteps
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.training.d2it_trainer import build_d2it_state, d2it_objective
from nativetok_jax.generation.diffusion_sampling import diffusion_sampler
from nativetok_jax.training.diffusion_trainer import build_dit_state, diffusion_objective, moments_shape
from nativetok_jax.training.state import BuiltState
from nativetok_jax.training.step import batch_shardings, make_train_step

SAMPLERS = (("ddpm", "250", 1.0), ("ddpm", "250", 4.0), ("ddim", "ddim50", 1.0), ("ddim", "ddim50", 4.0))


@dataclasses.dataclass(frozen=True)
class LatentBench:
    """What the benchmarks need of a task that diffuses latents: its ``tasks.Task.bench``.

    Attributes:
      latent_shape: ``config -> (h, w, c)``, the diffused latent.
      build: ``(config, mesh, rules) -> BuiltState``, the trainer's state builder.
      objective: ``(graphdef, diffusion, config) -> objective``, the trainer's (random latents have
        unit scale already).
      random_batch: ``(config, batch_size) -> {name: array}``, a batch as the trainer's store gives it.
      check: ``config -> None``, the run's validation without opening a VAE file or a DVAE run.
      grain_maps: whether the network also takes grain maps (D²iT's content transformer,
        ``model.content(x, t, y, grains)``).
    """

    latent_shape: Callable[[ml_collections.ConfigDict], tuple[int, int, int]]
    build: Callable[[ml_collections.ConfigDict, Any, Any], BuiltState]
    objective: Callable[[Any, Any, ml_collections.ConfigDict], Any]
    random_batch: Callable[[ml_collections.ConfigDict, int], dict[str, np.ndarray]]
    check: Callable[[ml_collections.ConfigDict], None]
    grain_maps: bool = False


def parts_of(config: ml_collections.ConfigDict) -> LatentBench:
    """The :class:`LatentBench` of ``config``'s task (``tasks.Task.bench``).

    Raises:
      ConfigError: a task that diffuses no latents (one line).
    """
    parts = tasks.of(config).load("bench")
    if not isinstance(parts, LatentBench):
        raise ConfigError(f"config.task: {tasks.task_name(config)!r} diffuses no latents (a DiT or D²iT config is "
                          "needed)")
    return parts


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """The diffused latent ``(h, w, c)`` of a DiT or D²iT config."""
    return parts_of(config).latent_shape(config)


def _grain_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
    h, w, _ = latent_shape(config)
    return h // 2, w // 2  # one grain per region of 2 x 2 fine cells


def _labels(config: ml_collections.ConfigDict, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, config.model.num_classes, batch_size).astype(np.int32)


def _dit_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = _labels(config, batch_size, rng)
    return {"moments": rng.standard_normal((batch_size, *moments_shape(config.model)), np.float32), "label": labels}


def _d2it_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
    """Routed moments and grain maps, half the regions fine."""
    rng = np.random.default_rng(0)
    labels = _labels(config, batch_size, rng)
    moments = (batch_size, 2, *latent_shape(config))
    return {"mean": rng.standard_normal(moments, np.float32), "logvar": np.full(moments, -4.0, np.float32),
            "grains": rng.integers(0, 2, (batch_size, 2, *_grain_shape(config))).astype(np.int32), "label": labels}


def _check_dit(config: ml_collections.ConfigDict) -> None:
    checked = ml_collections.ConfigDict(config.to_dict())
    checked.model.autoencoder.kind = "pixels"  # the step sees latents: no SD-VAE file is opened
    validate_dit(checked)  # the training fields (the model's are checked when it is built)


def _check_d2it(config: ml_collections.ConfigDict) -> None:
    checked = ml_collections.ConfigDict(config.to_dict())
    checked.dvae.workdir = checked.dvae.workdir or "(not opened)"  # no Dynamic VAE run is opened
    validate_d2it(checked)


DIT = LatentBench(
    latent_shape=lambda config: dit_latent_shape(config.model), build=build_dit_state,
    objective=lambda graphdef, diffusion, config: diffusion_objective(graphdef, diffusion,
                                                                      config.model.label_drop_probability),
    random_batch=_dit_batch, check=_check_dit)
D2IT = LatentBench(
    latent_shape=lambda config: d2it_latent_shape(config.model),
    build=lambda config, mesh, rules: build_d2it_state(config, _grain_shape(config), mesh, rules),
    objective=lambda graphdef, diffusion, config: d2it_objective(graphdef, diffusion, config, latent_scale=1.0),
    random_batch=_d2it_batch, check=_check_d2it, grain_maps=True)


def _build(config: ml_collections.ConfigDict, mesh: Any, rules: Any) -> BuiltState:
    return parts_of(config).build(config, mesh, rules)


def _random_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
    """A batch as the trainer's latent store gives it, random."""
    return parts_of(config).random_batch(config, batch_size)


def _step(config: ml_collections.ConfigDict, batch_size: int):
    mesh = sharding.make_mesh(config.mesh)
    built = _build(config, mesh, sharding.rules_of(config))
    diffusion = build_diffusion(config.model.diffusion.schedule, config.model.diffusion.num_steps,
                                learn_sigma=config.model.learn_sigma)
    objective = parts_of(config).objective(built.graphdef, diffusion, config)
    arrays = _random_batch(config, batch_size)
    shardings = batch_shardings(mesh, {name: value.shape for name, value in arrays.items()})
    step = make_train_step(objective, built, shardings, seed=0, ema_decay=config.train.ema_decay)
    batch = {name: jax.device_put(value, shardings[name]) for name, value in arrays.items()}
    return step, built, batch


def measure_train(config: ml_collections.ConfigDict, batch_size: int, steps: int) -> dict[str, Any]:
    start = time.perf_counter()
    step, built, batch = _step(config, batch_size)
    compiled = step.compile(built.state, batch)
    compile_s = time.perf_counter() - start
    state = built.state
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times, cpu = [], time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    cpu_s = (time.process_time() - cpu) / steps
    step_s = statistics.median(times)
    counting = ml_collections.ConfigDict(config.to_dict())
    counting.model.unroll_scans = True
    step_c, built_c, batch_c = _step(counting, batch_size)
    analysis = step_c.compile(built_c.state, batch_c).executable.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    flops = float(analysis.get("flops", float("nan"))) if analysis else float("nan")
    return dict(step_s=step_s, images_per_s=batch_size / step_s, cpu_s_per_step=cpu_s, compile_s=compile_s,
                step_gflops=flops / 1e9)


def measure_sampler(config: ml_collections.ConfigDict, state: Any, graphdef: Any, mesh: Any, rules: Any,
                    method: str, respacing: str, guidance_scale: float, num_images: int,
                    timed_steps: int) -> dict[str, Any]:
    """Images per second of a full ``respacing`` run, timed over ``timed_steps`` steps (0: all)."""
    full = len(space_timesteps(config.model.diffusion.num_steps, respacing))
    steps = full if not timed_steps else min(timed_steps, full)
    timed = respacing if steps == full else (f"ddim{steps}" if respacing.startswith("ddim") else str(steps))
    labels = np.arange(num_images, dtype=np.int32) % config.model.num_classes
    if parts_of(config).grain_maps:
        sample = diffusion_sampler(graphdef, config.model, mesh, method=method, respacing=timed,
                                   guidance_scale=guidance_scale, shape=latent_shape(config),
                                   apply_fn=lambda params, x, t, y, g: nnx.merge(graphdef, params).content(x, t, y, g))
        grains = np.asarray(jax.random.bernoulli(jax.random.key(2), 0.5, (num_images, *_grain_shape(config))), np.int32)
        inputs = (None, grains)
    else:
        sample = diffusion_sampler(graphdef, config.model, mesh, method=method, respacing=timed,
                                   guidance_scale=guidance_scale)
        inputs = ()
    with jax.set_mesh(mesh), axis_rules(rules):
        jax.block_until_ready(sample(state, labels, jax.random.key(0), *inputs))  # compile
        start = time.perf_counter()
        jax.block_until_ready(sample(state, labels, jax.random.key(1), *inputs))
        seconds = (time.perf_counter() - start) * full / steps
    return dict(sampler=method, steps=full, timed_steps=steps, guidance_scale=guidance_scale, num_images=num_images,
                seconds=seconds, images_per_s=num_images / seconds)


# The default configs and the sizes that keep the whole benchmark to minutes on a 2-core CPU.
DEFAULTS = {
    "configs/dit.py:B": dict(batch_sizes=2, sample_images=1, sampler_steps=4),
    "configs/dit_demo.py": dict(batch_sizes=32, sample_images=8, sampler_steps=0),
}


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m nativetok_jax.bench diffusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated diffusion config files[:arg] (default: {','.join(DEFAULTS)})")
    parser.add_argument("--batch_sizes", default=None,
                        help="global train batch size, one per config or one for all (needed with --configs)")
    parser.add_argument("--sample_images", default=None,
                        help="images per sampler run, one per config or one for all (needed with --configs)")
    parser.add_argument("--sampler_steps", default=None,
                        help="sampler steps timed, one per config or one for all (0: all; fewer are scaled to "
                             "the full count; needed with --configs)")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps after one warm-up step")
    parser.add_argument("--out", default="bench_results/diffusion.json")
    args = parser.parse_args(argv)
    storage.check_writable(args.out, "--out")  # in seconds, not after the runs it is to hold
    specs = args.configs.split(",") if args.configs else list(DEFAULTS)

    def per_config(value: str | None, name: str) -> list[int]:
        # The defaults are sized for the default configs; other configs name their own, so a
        # default never lands silently on a config it was not meant for.
        if value is None:
            if args.configs:
                raise SystemExit(f"error: --{name}: give one value per config (or one for all) with --configs")
            return [DEFAULTS[spec][name] for spec in specs]
        numbers = [int(v) for v in value.split(",")]
        if len(numbers) == 1:
            numbers *= len(specs)
        if len(numbers) != len(specs):
            raise SystemExit(f"error: --{name} needs one value per config ({len(specs)}) or one for all, got {value!r}")
        return numbers

    batch_sizes = per_config(args.batch_sizes, "batch_sizes")
    images = per_config(args.sample_images, "sample_images")
    sampler_steps = per_config(args.sampler_steps, "sampler_steps")
    dtype = jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    peak = matmul_flops_per_second(dtype)
    report: dict[str, Any] = dict(benchmark="diffusion", device=jax.devices()[0].device_kind,
                                  num_devices=jax.device_count(), jax_version=jax.__version__,
                                  matmul_dtype=jnp.dtype(dtype).name, matmul_gflops_per_s=peak / 1e9,
                                  train=[], samplers=[])
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}: {jnp.dtype(dtype).name} matmul "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'config':>24} {'latent':>10} {'batch':>6} {'step ms':>9} {'img/s':>8} {'CPU s':>7} {'GFLOP/step':>11} "
          f"{'MFU':>6}")
    samplers = []
    for spec, batch_size in zip(specs, batch_sizes):
        config = load_config_file(spec)
        parts_of(config).check(config)
        latent = "x".join(map(str, latent_shape(config)))
        row = dict(config=spec, latent=latent, batch_size=batch_size, **measure_train(config, batch_size, args.steps))
        row["mfu"] = row["step_gflops"] * 1e9 / row["step_s"] / peak
        report["train"].append(row)
        print(f"{spec:>24} {latent:>10} {batch_size:>6} {row['step_s'] * 1e3:>9.1f} {row['images_per_s']:>8.2f} "
              f"{row['cpu_s_per_step']:>7.2f} {row['step_gflops']:>11.1f} {row['mfu']:>6.1%}", flush=True)
        write_json(args.out, report)
        samplers.append(config)
    print(f"{'config':>24} {'sampler':>8} {'steps':>6} {'timed':>6} {'guidance':>9} {'images':>7} {'s':>9} "
          f"{'img/s':>9}")
    for spec, config, count, timed in zip(specs, samplers, images, sampler_steps):
        mesh = sharding.make_mesh(config.mesh)
        rules = sharding.rules_of(config)
        built = _build(config, mesh, rules)
        for method, respacing, scale in SAMPLERS:
            row = dict(config=spec, **measure_sampler(config, built.state["params"], built.graphdef, mesh, rules,
                                                      method, respacing, scale, count, timed))
            report["samplers"].append(row)
            print(f"{spec:>24} {method:>8} {row['steps']:>6} {row['timed_steps']:>6} {scale:>9.1f} {count:>7} "
                  f"{row['seconds']:>9.2f} {row['images_per_s']:>9.3g}", flush=True)
            write_json(args.out, report)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report
