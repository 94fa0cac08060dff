"""``python -m nativetok_jax.bench {compile,model,train,generate,compare,profile,diffusion} [options]``."""

from __future__ import annotations

import sys

import jax

from nativetok_jax.bench import aot, compare, diffusion, generate, model, profile, train

BENCHMARKS = {"compile": aot.run, "model": model.run, "train": train.run, "generate": generate.run,
              "compare": compare.run, "profile": profile.run,
              "diffusion": diffusion.run}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHMARKS:
        raise SystemExit(f"usage: python -m nativetok_jax.bench {{{','.join(BENCHMARKS)}}} [--help]")
    jax.config.update("jax_enable_compilation_cache", False)  # compile times must be real compiles
    BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
