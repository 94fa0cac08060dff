"""``python -m nativetok_jax.bench train``: throughput of the real train step.

For each config: images per second, step time, model FLOPs per step (XLA's cost analysis of the
step with every scan unrolled, since XLA counts a loop body once), that rate as a fraction of the
FLOP/s of a large matrix product timed in the same run ("MFU" against what this device really
does, not its datasheet), and the peak memory of the compiled executable. Then the step time of a
Hierarchical Native Training growth stage (old experts, MIT, token head and codebook frozen;
forward only through the frozen experts) against training all experts at the same token count.
The step is the config's whole objective: with LPIPS, the proxy-code VQGAN (both with random
weights: speed does not depend on their values) and the discriminator when the config uses them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nativetok_jax import sharding, storage
from nativetok_jax.bench.model import write_json
from nativetok_jax.config import load_config_file
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.training import hnt
from nativetok_jax.training.adversarial import build_discriminator, uses_discriminator
from nativetok_jax.training.networks import load_networks
from nativetok_jax.training.optimizer import optimizer_state_bytes
from nativetok_jax.training.state import build_state
from nativetok_jax.training.tokenizer_objective import image_batch_shardings, tokenizer_train_step

GROWTH_FROZEN = ("mit", "old_experts", "token_head", "quantizer")


def matmul_flops_per_second(dtype: jnp.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a ``size``-square matrix product on the default device."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    product = jax.jit(lambda x: x @ x)
    jax.block_until_ready(product(a))
    start = time.perf_counter()
    for _ in range(repeats):
        a = product(a) * (1.0 / size)
    jax.block_until_ready(a)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _compiled_step(config: ml_collections.ConfigDict, batch_size: int, frozen: tuple[str, ...], num_old: int):
    """The config's whole train step (LPIPS, VQGAN with random weights, and the discriminator
    included), built by ``build_state`` and run under the mesh and the logical-axis rules, as the
    trainer runs it."""
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    built = build_state(lambda r: build_model(config.model, r), train=config.train, mesh=mesh, rules=rules,
                        num_steps=1000, freeze=(lambda p: hnt.trainable_mask(p, frozen, num_old)) if frozen else None)
    discriminator = None
    if uses_discriminator(config):
        discriminator, part, part_shardings = build_discriminator(config, 1000, mesh, rules)
        built.add_part("discriminator", part, part_shardings)
    size = config.model.image_size
    step = tokenizer_train_step(
        built, config, batch_size, frozen_experts=hnt.frozen_expert_count(frozen, num_old, config.model.num_tokens),
        networks=load_networks(config, random_weights=True), discriminator=discriminator,
    )
    shardings = image_batch_shardings(mesh, config, batch_size)
    batch = {
        "image": jax.device_put(np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), np.uint8),
                                shardings["image"]),
        "label": jax.device_put(np.zeros((batch_size,), np.int32), shardings["label"]),
    }
    state = built.state
    return step.compile(state, batch), state, batch, optimizer_state_bytes(state["opt_state"])


def unrolled_step_flops(config: ml_collections.ConfigDict, batch_size: int, frozen: tuple[str, ...] = (),
                        num_old: int = 0) -> float:
    """FLOPs of one train step by XLA's cost analysis, compiled with every scan unrolled (XLA counts
    a loop's body once); NaN where the backend gives no analysis."""
    counting = ml_collections.ConfigDict(config.to_dict())
    counting.model.unroll_scans = True
    analysis = _compiled_step(counting, batch_size, frozen, num_old)[0].executable.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def measure(config: ml_collections.ConfigDict, batch_size: int, steps: int, frozen: tuple[str, ...] = (),
            num_old: int = 0, count_flops: bool = True) -> dict[str, Any]:
    start = time.perf_counter()
    compiled, state, batch, opt_bytes = _compiled_step(config, batch_size, frozen, num_old)
    compile_s = time.perf_counter() - start
    memory = compiled.executable.memory_analysis()
    peak_bytes = None
    if memory is not None:
        peak_bytes = (memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
                      - memory.alias_size_in_bytes)
    state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = unrolled_step_flops(config, batch_size, frozen, num_old) if count_flops else float("nan")
    return dict(step_s=step_s, images_per_s=batch_size / step_s, compile_s=compile_s, step_gflops=flops / 1e9,
                peak_memory_mb=None if peak_bytes is None else peak_bytes / 2**20,
                optimizer_state_mb=opt_bytes / 2**20)


def largest_batch(config: ml_collections.ConfigDict, batch_size: int) -> int:
    """The largest ``batch_size * 2**k`` whose step compiles and runs (XLA reports running out of
    device memory as RESOURCE_EXHAUSTED); ``batch_size`` itself must fit."""
    while True:
        try:
            measure(config, 2 * batch_size, steps=1, count_flops=False)
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors end the search
            if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
                raise
            print(f"batch {2 * batch_size} does not fit: {str(error).splitlines()[0][:120]}", flush=True)
            return batch_size
        batch_size *= 2
        print(f"batch {batch_size} fits", flush=True)


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m nativetok_jax.bench train", description=__doc__)
    parser.add_argument("--configs", default="configs/demo.py,configs/nativetok_base.py",
                        help="comma-separated config files[:arg]")
    parser.add_argument("--batch_sizes", default="32,8", help="one global batch size per config")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--growth_config", default="configs/demo.py", help="config for the growth-stage timing")
    parser.add_argument("--growth_tokens", default="32,64", help="old,new token counts of the growth stage")
    parser.add_argument("--dtype", default="", help="override model.dtype of every config (float32, bfloat16)")
    parser.add_argument("--largest_batch", action="store_true",
                        help="double each config's batch size while the step still fits in memory, and "
                             "report the largest (the first config's growth stage uses the given batch)")
    parser.add_argument("--no_growth", action="store_true", help="skip the growth-stage timing")
    parser.add_argument("--out", default="bench_results/train.json")
    args = parser.parse_args(argv)
    storage.check_writable(args.out, "--out")  # in seconds, not after the runs it is to hold

    dtype = jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    peak = matmul_flops_per_second(dtype)
    report: dict[str, Any] = dict(benchmark="train", device=jax.devices()[0].device_kind,
                                  num_devices=jax.device_count(), jax_version=jax.__version__,
                                  matmul_dtype=jnp.dtype(dtype).name, matmul_gflops_per_s=peak / 1e9,
                                  rows=[], growth={})
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}: {jnp.dtype(dtype).name} matmul "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'config':>32} {'batch':>6} {'step ms':>9} {'img/s':>8} {'GFLOP/step':>11} {'MFU':>6} {'peak MB':>8} "
          f"{'opt MB':>7}")
    # Steps measured so far, by (config, batch): the growth stage's all-experts step reuses a row's
    # when they are the same step (one compile less).
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    for spec, batch_size in zip(args.configs.split(","), (int(b) for b in args.batch_sizes.split(","))):
        config = load_config_file(spec)
        if args.dtype:
            config.model.dtype = args.dtype
        if args.largest_batch:
            batch_size = largest_batch(config, batch_size)
        step = measured[(config.to_json(), batch_size)] = measure(config, batch_size, args.steps)
        row = dict(config=spec, dtype=config.model.dtype, batch_size=batch_size, **step)
        row["mfu"] = row["step_gflops"] * 1e9 / row["step_s"] / peak
        report["rows"].append(row)
        memory = "n/a" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.0f}"
        print(f"{spec:>32} {batch_size:>6} {row['step_s'] * 1e3:>9.1f} {row['images_per_s']:>8.1f} "
              f"{row['step_gflops']:>11.2f} {row['mfu']:>6.1%} {memory:>8} {row['optimizer_state_mb']:>7.1f}", flush=True)
        write_json(args.out, report)

    if args.no_growth:
        print(f"wrote {args.out}")
        return report
    old, new = (int(t) for t in args.growth_tokens.split(","))
    config = load_config_file(args.growth_config)
    config.model.num_tokens = new
    if args.dtype:
        config.model.dtype = args.dtype
    batch_size = int(args.batch_sizes.split(",")[0])
    full = measured.get((config.to_json(), batch_size)) or measure(config, batch_size, args.steps, count_flops=False)
    growth = measure(config, batch_size, args.steps, frozen=GROWTH_FROZEN, num_old=old, count_flops=False)
    report["growth"] = dict(config=args.growth_config, old_tokens=old, new_tokens=new, frozen=list(GROWTH_FROZEN),
                            all_experts_step_s=full["step_s"], growth_stage_step_s=growth["step_s"],
                            speedup=full["step_s"] / growth["step_s"],
                            all_experts_optimizer_state_mb=full["optimizer_state_mb"],
                            growth_stage_optimizer_state_mb=growth["optimizer_state_mb"])
    print(f"growth stage {old}->{new} tokens: {growth['step_s'] * 1e3:.1f} ms/step vs "
          f"{full['step_s'] * 1e3:.1f} ms training all experts ({report['growth']['speedup']:.2f}x faster); "
          f"optimiser state {growth['optimizer_state_mb']:.1f} MB vs {full['optimizer_state_mb']:.1f} MB")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report
