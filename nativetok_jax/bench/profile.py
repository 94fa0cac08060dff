"""``python -m nativetok_jax.bench profile``: where a tokenizer train step's time goes, by XLA operation.

It compiles the step that ``bench compare`` times (the prototype's sizes at ``--tokens``, or any
tokenizer config with ``--config``), runs ``--steps`` steps under ``jax.profiler.trace``, reads the
trace back (``jax.profiler.ProfileData``) and adds up the time of every XLA operation of the step,
grouped three ways:

- **phase**, from the operation's JAX source (``op_name`` metadata): ``forward`` (under ``jvp``),
  ``backward`` (under ``transpose(jvp)``), ``other`` (loss reductions, the optimiser, EMA) and
  ``unattributed`` (operations XLA inserted itself, such as layout copies);
- **kind**, from XLA's name for the operation: ``matmul`` (dots, YNNPACK / oneDNN fusions,
  convolutions), ``copy/transpose``, ``dynamic slice/update`` (how a ``lax.scan`` reads its stacked
  inputs and writes its stacked residuals and gradients), ``broadcast``, ``elementwise/reduce``;
- **source**: the ``op_name`` with ``jit(step)/`` and the ``closed_call`` wrappers removed, so
  ``while/body/while/body/...`` reads as "inside two nested scans" (the expert scan and each
  expert's layer scan, or a transformer's layer scan).

Each group and source also gets ``ops``, the operations it ran per step (trace events; a loop's
body counts once per iteration): unlike times, these counts do not depend on the machine's load.
``--count_flops`` adds XLA's FLOP count of the step compiled with every scan unrolled
(``unrolled_step_gflops``; ``step_gflops`` is the scanned step's, which counts a loop body once).

Control flow (``while``, ``call``, ``conditional``) is left out: its time is its body's. Times are
per step, summed over XLA's threads, so on several cores they add up to more than the step's wall
time: compare shares, not totals, between machines; and time it on an otherwise idle machine
(a loaded one stretches every operation by the time its thread waited). The trace itself stays
in ``--trace_dir`` for TensorBoard's or XProf's viewer. Matched by name against the compiled
module's instructions, which is how XLA:CPU names its trace events; on a GPU read the kept trace
in XProf instead (its events are kernels, which this table does not attribute).

Writes ``--out`` (JSON) and prints the tables.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import tempfile
import time
from typing import Any, NamedTuple

import jax
import ml_collections

from nativetok_jax import storage
from nativetok_jax.bench.compare import PROTOTYPE, TINY, compare_config, override_field
from nativetok_jax.bench.model import write_json
from nativetok_jax.bench.train import _compiled_step, matmul_flops_per_second, unrolled_step_flops
from nativetok_jax.config import load_config_file

CONTROL_FLOW = ("while", "call", "conditional")
KINDS = ("matmul", "copy/transpose", "dynamic slice/update", "broadcast", "elementwise/reduce")
# "%name = shape opcode(" in XLA's HLO text: the first "word(" after the "=" is the opcode (a tuple
# shape's "(" follows a space, not a word).
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = [^\n]*?(?<![\w\-])([a-z][a-z0-9\-]*)\(")
_OP_NAME = re.compile(r"metadata=\{[^}\n]*?op_name=\"([^\"]+)\"")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_MATMUL_OPCODES = ("dot", "convolution", "custom-call")


class Instruction(NamedTuple):
    opcode: str
    source: str | None  # JAX's op_name, None for what XLA inserted
    kind: str


def hlo_instructions(hlo_text: str) -> dict[str, Instruction]:
    """Every instruction of a compiled module's HLO text, by name, with its opcode, JAX source and kind.

    A fusion's kind is ``matmul`` when its fused computation holds a dot or convolution (XLA:CPU
    hands such fusions to YNNPACK / oneDNN), else it comes from the fused operations XLA names it after.
    """
    computations: dict[str, list[str]] = {}
    body: list[str] | None = None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            body = computations.setdefault(line.split()[0 if line[0] == "%" else -2].lstrip("%"), [])
        elif body is not None and line.strip() != "}":
            body.append(line)
    calls_matmul = {name: any(re.search(rf"(?<![\w\-])({'|'.join(_MATMUL_OPCODES)})\(", l) for l in lines)
                    for name, lines in computations.items()}
    instructions = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode = match.groups()
        source = _OP_NAME.search(line)
        called = _CALLS.search(line)
        matmul = opcode in _MATMUL_OPCODES or (opcode == "fusion" and called is not None
                                               and calls_matmul.get(called.group(1), False))
        instructions[name] = Instruction(opcode, source.group(1) if source else None,
                                         "matmul" if matmul else kind_of(name, opcode))
    return instructions


def kind_of(name: str, opcode: str) -> str:
    """The kind of work a non-matmul instruction does, from XLA's name for it (a fusion's name
    lists what it fuses)."""
    if "dynamic-slice" in name or "dynamic-update-slice" in name or opcode.startswith("dynamic"):
        return "dynamic slice/update"
    if name.startswith("copy") or "transpose" in name or opcode in ("copy", "transpose"):
        return "copy/transpose"
    if "broadcast" in name or opcode == "broadcast":
        return "broadcast"
    return "elementwise/reduce"


def phase_of(source: str | None) -> str:
    if source is None:
        return "unattributed"
    if "transpose(jvp(" in source:
        return "backward"
    if "jvp(" in source:
        return "forward"
    return "other"


def short_source(source: str | None) -> str:
    """``op_name`` without the jit and ``closed_call`` wrappers or numeric suffixes."""
    if source is None:
        return "(inserted by XLA)"
    source = re.sub(r"^jit\([^)]*\)/", "", source)
    source = source.replace("closed_call/", "")
    return re.sub(r"\.\d+", "", source)


def attribute(events: list[tuple[str, float]], instructions: dict[str, Instruction], num_steps: int) -> dict[str, Any]:
    """Sums ``(instruction name, milliseconds)`` trace events per step by phase, kind and source.

    Events whose name is not an instruction of the module (executor bookkeeping, other programs)
    and control-flow instructions are skipped.
    """
    by_group: collections.Counter = collections.Counter()
    by_source: collections.Counter = collections.Counter()
    ops_by_group: collections.Counter = collections.Counter()
    ops_by_source: collections.Counter = collections.Counter()
    for name, ms in events:
        instruction = instructions.get(name)
        if instruction is None or instruction.opcode in CONTROL_FLOW:
            continue
        group, source = (phase_of(instruction.source), instruction.kind), (short_source(instruction.source),
                                                                          instruction.kind)
        by_group[group] += ms / num_steps
        by_source[source] += ms / num_steps
        ops_by_group[group] += 1 / num_steps
        ops_by_source[source] += 1 / num_steps
    total = sum(by_group.values())
    groups = [dict(phase=p, kind=k, ms=ms, share=ms / total if total else 0.0, ops=ops_by_group[(p, k)])
              for (p, k), ms in sorted(by_group.items(), key=lambda item: -item[1])]
    top = [dict(source=s, kind=k, ms=ms, share=ms / total if total else 0.0, ops=ops_by_source[(s, k)])
           for (s, k), ms in by_source.most_common(25)]
    return dict(op_ms_per_step=total, ops_per_step=sum(ops_by_group.values()), groups=groups, top_sources=top)


def trace_events(trace_dir: str) -> list[tuple[str, float]]:
    """``(name, milliseconds)`` of every event of the newest trace under ``trace_dir``."""
    paths = sorted((os.path.join(root, f) for root, _, files in os.walk(trace_dir) for f in files
                    if f.endswith(".xplane.pb")), key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(paths[-1])
    return [(event.name, event.duration_ns / 1e6) for plane in data.planes for line in plane.lines
            for event in line.events]


def profile(config: ml_collections.ConfigDict, batch_size: int, num_steps: int, trace_dir: str,
            count_flops: bool = False) -> dict[str, Any]:
    """Compiles the config's train step, times ``num_steps`` steps, then traces as many; with
    ``count_flops`` also compiles it with every scan unrolled for XLA's exact FLOP count."""
    start = time.perf_counter()
    compiled, state, batch, _ = _compiled_step(config, batch_size, (), 0)
    compile_s = time.perf_counter() - start
    instructions = hlo_instructions(compiled.executable.as_text())
    cost = compiled.executable.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_steps):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    wall, cpu = (time.perf_counter() - wall) / num_steps, (time.process_time() - cpu) / num_steps
    with jax.profiler.trace(trace_dir):
        for _ in range(num_steps):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
    result = attribute(trace_events(trace_dir), instructions, num_steps)
    flops = float((cost or {}).get("flops", 0.0))
    unrolled = unrolled_step_flops(config, batch_size) / 1e9 if count_flops else None
    return dict(compile_s=compile_s, step_s=wall, process_cpu_s=cpu, step_gflops=flops / 1e9,
                gflops_per_s=flops / 1e9 / wall if wall else 0.0, unrolled_step_gflops=unrolled, **result)


def format_report(report: dict[str, Any]) -> list[str]:
    lines = [f"step {report['step_s'] * 1e3:.1f} ms wall, {report['process_cpu_s'] * 1e3:.1f} ms process CPU, "
             f"{report['step_gflops']:.2f} GFLOP ({report['gflops_per_s']:.1f} GFLOP/s; a 2048 x 2048 matmul: "
             f"{report['matmul_gflops_per_s']:.1f}); operations {report['op_ms_per_step']:.1f} ms per step "
             f"summed over threads, {report['ops_per_step']:.0f} operations run per step"]
    if report.get("unrolled_step_gflops") is not None:
        lines.append(f"XLA's cost analysis of the step with every scan unrolled: {report['unrolled_step_gflops']:.2f} "
                     f"GFLOP per step")
    lines.append(f"{'phase':>13} {'kind':>21} {'ms/step':>9} {'share':>7} {'ops/step':>9}")
    lines += [f"{g['phase']:>13} {g['kind']:>21} {g['ms']:>9.1f} {100 * g['share']:>6.1f}% {g['ops']:>9.0f}"
              for g in report["groups"]]
    lines.append(f"{'ms/step':>9} {'share':>7} {'ops/step':>9} {'kind':>21}  source")
    lines += [f"{s['ms']:>9.1f} {100 * s['share']:>6.1f}% {s['ops']:>9.0f} {s['kind']:>21}  {s['source']}"
              for s in report["top_sources"]]
    return lines


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m nativetok_jax.bench profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="a tokenizer config file (default: bench compare's sizes)")
    parser.add_argument("--tokens", type=int, default=128, help="token count at bench compare's sizes")
    parser.add_argument("--chunks", type=int, default=None, help="model.experts.chunks (default: the config's)")
    parser.add_argument("--tiny", action="store_true", help="bench compare's seconds-long size")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="steps timed, then as many traced")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. model.experts.remat=True (repeatable)")
    parser.add_argument("--count_flops", action="store_true",
                        help="also compile the step with every scan unrolled for XLA's exact FLOP count (slow to "
                             "compile at large L; the scanned step's count has each loop body once)")
    parser.add_argument("--trace_dir", default="", help="where the trace stays (default: a temporary directory)")
    parser.add_argument("--out", default="bench_results/profile.json")
    args = parser.parse_args(argv)
    storage.check_writable(args.out, "--out")  # in seconds, not after the runs it is to hold
    if args.config:
        config = load_config_file(args.config)
    else:
        config = compare_config(TINY if args.tiny else PROTOTYPE, args.tokens, "float32", args.chunks)
    for assignment in args.set:
        override_field(config, assignment)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="nativetok_profile_")
    report: dict[str, Any] = dict(
        benchmark="profile", config=args.config or ("tiny" if args.tiny else "prototype"),
        num_tokens=config.model.num_tokens, chunks=config.model.experts.chunks, overrides=list(args.set),
        batch_size=args.batch_size, device=jax.devices()[0].device_kind, jax_version=jax.__version__,
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        matmul_gflops_per_s=matmul_flops_per_second(jax.numpy.float32) / 1e9, trace_dir=trace_dir)
    report.update(profile(config, args.batch_size, args.steps, trace_dir, args.count_flops))
    for line in format_report(report):
        print(line)
    write_json(args.out, report)
    print(f"wrote {args.out} (trace in {trace_dir})")
    return report
