"""``python -m nativetok_jax.bench model``: compile and step time of the tokenizer.

For every token count L it jits forward+backward of the reconstruction + quantiser loss, with
the scanned expert stack and (optionally) with the prototype's unrolled Python loop, and
records compile time, median step time, and the forward pass's FLOPs from XLA's cost analysis
(counted on a copy with every scan unrolled, as XLA counts a loop body once). The scanned stack's compile time should stay flat in L; the unrolled one's grows.
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
from flax import nnx

from nativetok_jax import sharding, storage
from nativetok_jax.config import load_config_file
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.storage import write_json  # also what the other benchmarks write their JSON with


def reconstruction_loss(model, images: jax.Array) -> jax.Array:
    reconstruction, quantized = model(images)
    return jnp.mean(jnp.square(reconstruction - images)) + quantized.loss


def flops_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def measure(config: ml_collections.ConfigDict, batch_size: int, steps: int) -> dict[str, Any]:
    """Compile and time one configuration's forward+backward on the config's mesh."""
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    graphdef, params, shardings = sharding.init_sharded(lambda r: build_model(config.model, r), 0, mesh, rules)
    size = config.model.image_size
    images = jax.random.uniform(jax.random.key(1), (batch_size, size, size, 3), minval=-1.0, maxval=1.0)
    images = jax.device_put(images, sharding.batch_sharding(mesh, images.shape))

    def loss(params, images):
        return reconstruction_loss(nnx.merge(graphdef, params), images)

    # XLA's cost analysis counts a while loop's body once: count FLOPs on the unrolled program.
    counting = ml_collections.ConfigDict(config.model.to_dict())
    counting.unroll_scans = True
    counting_graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(counting, nnx.Rngs(0))))

    def forward(params, images):
        return nnx.merge(counting_graphdef, params)(images)[0]

    grad_step = jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings))
    with jax.set_mesh(mesh), axis_rules(rules):
        start = time.perf_counter()
        compiled = grad_step.lower(params, images).compile()
        compile_s = time.perf_counter() - start
        forward_flops = flops_of(jax.jit(forward).lower(params, images).compile())
        jax.block_until_ready(compiled(params, images))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, images))
            times.append(time.perf_counter() - start)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return dict(
        compile_s=compile_s,
        step_s=statistics.median(times),
        forward_gflops=forward_flops / 1e9,
        num_params=num_params,
    )


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m nativetok_jax.bench model", description=__doc__)
    parser.add_argument("--config", default="configs/demo.py", help="config file[:arg] (default: the demo)")
    parser.add_argument("--tokens", default="32,64,128", help="comma-separated token counts")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--unrolled_tokens", default="32,64",
                        help="token counts that also time the unrolled reference ('' for none); its compile "
                             "time grows fast: about 90 s at L=32 and 250 s at L=64 for the demo on 2 CPU cores")
    parser.add_argument("--out", default="bench_results/model.json")
    args = parser.parse_args(argv)
    storage.check_writable(args.out, "--out")  # in seconds, not after the runs it is to hold

    base = load_config_file(args.config)
    unrolled = {int(t) for t in args.unrolled_tokens.split(",") if t}
    rows = []
    for num_tokens in [int(t) for t in args.tokens.split(",")]:
        for scan in (True, False) if num_tokens in unrolled else (True,):
            config = ml_collections.ConfigDict(base.to_dict())
            config.model.num_tokens = num_tokens
            config.model.experts.scan = scan
            result = measure(config, args.batch_size, args.steps)
            rows.append(dict(num_tokens=num_tokens, experts="scanned" if scan else "unrolled", **result))
            print_row(rows[-1], header=len(rows) == 1)
            report = dict(
                benchmark="model",
                config=args.config,
                batch_size=args.batch_size,
                image_size=base.model.image_size,
                device=jax.devices()[0].device_kind,
                num_devices=jax.device_count(),
                jax_version=jax.__version__,
                rows=rows,
            )
            write_json(args.out, report)  # after every row: a long run keeps what it measured
    print(f"wrote {args.out}")
    return report


COLUMNS = (  # key, title, format
    ("num_tokens", "L", "{:>5d}"),
    ("experts", "experts", "{:>9s}"),
    ("compile_s", "compile s", "{:>10.2f}"),
    ("step_ms", "step ms", "{:>10.1f}"),
    ("forward_gflops", "fwd GFLOP", "{:>10.2f}"),
    ("params_m", "params M", "{:>9.2f}"),
)


def print_row(row: dict[str, Any], header: bool) -> None:
    values = dict(row, step_ms=row["step_s"] * 1e3, params_m=row["num_params"] / 1e6)
    cells = [fmt.format(values[key]) for key, _, fmt in COLUMNS]
    if header:
        print(" ".join(title.rjust(len(cell)) for (_, title, _), cell in zip(COLUMNS, cells)))
    print(" ".join(cells), flush=True)
