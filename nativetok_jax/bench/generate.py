"""``python -m nativetok_jax.bench generate``: per-token time of the autoregressive samplers.

Times the key/value-cached sampler against the uncached reference (which recomputes the whole
prefix at every position) on one GPT size, both drawing the same tokens: compile time, then the
median over ``--repeats`` runs of sampling ``--num_tokens`` tokens for ``--batch_size`` labels
(doubled when guidance is on). Weights are random; speed does not depend on their values. The
default size is small enough for a laptop CPU; ``--width 768 --depth 12 --num_heads 12`` is
LlamaGen-B.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nativetok_jax import storage
from nativetok_jax.bench.model import write_json
from nativetok_jax.generation.autoregressive import sampler
from nativetok_jax.models.generators.gpt import GPT


def measure(
    graphdef: nnx.GraphDef, params, labels: jax.Array, *, use_cache: bool, repeats: int, **settings
) -> tuple[dict[str, Any], jax.Array]:
    """Compile time and median wall time of one sampler; also returns its tokens."""
    run = sampler(graphdef, use_cache=use_cache, **settings)
    args = (params, labels, jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0), jnp.float32(2.0))
    start = time.perf_counter()
    compiled = run.lower(*args).compile()
    compile_s = time.perf_counter() - start
    tokens = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return dict(compile_s=compile_s, sample_s=statistics.median(times)), tokens


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m nativetok_jax.bench generate", description=__doc__)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=4096, help="the tokenizer's codebook size")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=8, help="images per call (rows double with guidance)")
    parser.add_argument("--num_tokens", type=int, default=128)
    parser.add_argument("--no_guidance", action="store_true", help="sample without classifier-free guidance")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up run")
    parser.add_argument("--out", default="bench_results/generate.json")
    args = parser.parse_args(argv)
    storage.check_writable(args.out, "--out")  # in seconds, not after the runs it is to hold

    model = GPT(
        vocab_size=args.vocab_size, num_tokens=args.num_tokens, num_classes=args.num_classes,
        width=args.width, depth=args.depth, num_heads=args.num_heads, dtype=jnp.dtype(args.dtype),
        zero_head=False, rngs=nnx.Rngs(0),
    )
    graphdef, params = nnx.split(model)
    labels = jnp.arange(args.batch_size, dtype=jnp.int32) % args.num_classes
    settings = dict(num_tokens=args.num_tokens, top_k=0, nucleus=False, guided=not args.no_guidance)
    rows = []
    tokens = {}
    for use_cache in (True, False):
        result, tokens[use_cache] = measure(
            graphdef, params, labels, use_cache=use_cache, repeats=args.repeats, **settings
        )
        rows.append(dict(sampler="cached" if use_cache else "uncached", **result))
        print_row(rows[-1], args.num_tokens, header=len(rows) == 1)
    speedup = rows[1]["sample_s"] / rows[0]["sample_s"]
    same = bool(np.array_equal(tokens[True], tokens[False]))
    print(f"speed-up of the cache at {args.num_tokens} tokens: {speedup:.1f}x (same tokens: {same})")
    report = dict(
        benchmark="generate",
        width=args.width,
        depth=args.depth,
        num_heads=args.num_heads,
        vocab_size=args.vocab_size,
        batch_size=args.batch_size,
        guidance=not args.no_guidance,
        num_tokens=args.num_tokens,
        dtype=args.dtype,
        num_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        device=jax.devices()[0].device_kind,
        jax_version=jax.__version__,
        rows=[dict(row, ms_per_token=row["sample_s"] * 1e3 / args.num_tokens) for row in rows],
        speedup=speedup,
        same_tokens=same,
    )
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


COLUMNS = (  # key, title, format
    ("sampler", "sampler", "{:>9s}"),
    ("compile_s", "compile s", "{:>10.2f}"),
    ("sample_ms", "sample ms", "{:>10.1f}"),
    ("ms_per_token", "ms/token", "{:>9.3f}"),
)


def print_row(row: dict[str, Any], num_tokens: int, header: bool) -> None:
    values = dict(row, sample_ms=row["sample_s"] * 1e3, ms_per_token=row["sample_s"] * 1e3 / num_tokens)
    cells = [fmt.format(values[key]) for key, _, fmt in COLUMNS]
    if header:
        print(" ".join(title.rjust(len(cell)) for (_, title, _), cell in zip(COLUMNS, cells)))
    print(" ".join(cells), flush=True)
