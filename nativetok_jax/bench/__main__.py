"""``python -m nativetok_jax.bench {compile,model,train,generate,compare,profile,diffusion} [options]``: measure
the project's models (``python -m nativetok_jax.bench NAME --help`` for one benchmark's options).
"""

from __future__ import annotations

import sys

import jax

from nativetok_jax.bench import aot, compare, diffusion, generate, model, profile, train
from nativetok_jax.errors import one_line_errors

BENCHMARKS = {"compile": aot.run, "model": model.run, "train": train.run, "generate": generate.run,
              "compare": compare.run, "profile": profile.run,
              "diffusion": diffusion.run}


HELP_FLAGS = ("-h", "--help", "-help")


def usage() -> str:
    """The docstring, then each benchmark with the first line of its module's docstring."""
    lines = [__doc__.strip(), "", "benchmarks:"]
    for name, run in BENCHMARKS.items():
        summary = (sys.modules[run.__module__].__doc__ or "").strip().split("\n\n")[0]
        lines.append(f"  {name:<10} {' '.join(summary.split())}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv and argv[0] in HELP_FLAGS:
        print(usage())
        return
    if not argv or argv[0] not in BENCHMARKS:
        raise SystemExit(f"usage: python -m nativetok_jax.bench {{{','.join(BENCHMARKS)}}} [--help]")
    jax.config.update("jax_enable_compilation_cache", False)  # compile times must be real compiles
    with one_line_errors():  # a bad flag, file or output place is one line; a bug keeps its traceback
        BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
