"""``python -m nativetok_jax.bench compile``: the real train step compiled ahead of time for a TPU
topology, on a machine without a TPU: does it fit in HBM, and how fast does XLA estimate it runs?

For each config it builds the mesh (the config's ``data``/``fsdp``/``model`` axes and rules) over
the devices of a TPU topology (``jax.experimental.topologies``: ``v5p:2x2x1``, ``v5e:16x16``, ...;
libtpu compiles for them on any machine: ``pip install -e '.[tpu]' -c requirements.txt``), the
train state (parameters, optimiser, EMA, a discriminator where the config has one) as
``ShapeDtypeStruct``\\ s with their shardings (the trainers' own builders under ``jax.eval_shape``:
nothing is initialised), a batch of the given global size, and lowers and compiles the very
``TrainStep`` the training loop runs (``step.make_train_step``: same function, same shardings).

Each row (JSON ``rows``; per chip unless named otherwise):

- ``hbm_per_chip_bytes``: arguments + outputs + temporaries - aliased (donated) bytes, from the
  compiled executable's memory analysis; ``fits``: at most ``hbm_capacity_bytes``, the chip's HBM
  (a compile that XLA itself refuses for memory gives ``fits`` false with its first line).
- ``model_flops_per_chip``: matrix-product FLOPs of forward + backward *without* recomputation:
  counted on the traced step (every ``dot_general`` and convolution, each loop body times its trip
  count) of the config with every ``remat`` off; trainable weights get two backward products,
  frozen ones one.
- ``hardware_flops_per_chip``, ``estimated_step_s``: XLA's cost analysis of the compiled program
  (``flops``; ``optimal_seconds``, its cost-model *estimate* of the step time, not a measurement).
  XLA's TPU cost analysis counts a while loop's body once (a scanned stack of 8 layers reports one
  layer's FLOPs), so the FLOPs are scaled by the traced step's matrix FLOPs counting every
  iteration over those counting each loop body once (``loop_scale``), and the seconds by the TPU
  compiler's own per-fusion cycle estimates summed the same two ways (``cycles_loop_scale``);
  its cost model also adds -1 s per operation it cannot cost (seen: f32 all-gathers), which is
  added back (``xla_uncosted_ops``: those operations' time is not in the estimate).
  ``xla_flops_loop_bodies_once`` and ``xla_optimal_seconds_loop_bodies_once`` keep XLA's raw figures.
- ``estimated_mfu``: model FLOPs / (estimated step x the chip's peak bf16 FLOP/s): an *estimate*.
- ``collective_bytes``: bytes of the operands of every all-reduce, all-gather, reduce-scatter,
  all-to-all and collective-permute in the optimised HLO, by kind, loop bodies times their known
  trip counts.
- ``compile_s``: lowering + compilation wall time on this machine.

``--largest_batch`` doubles each config's global batch while its step fits and reports the last
that does. ``--sampler`` also compiles one guided sampling step of each generator config for the
same search: a DiT/D²iT network call (the batch doubled), an AR generator's decode step with its
key/value cache, a MaskGIT step. Generator configs are shaped by the tokenizer ``generator.tokenizer``
names (a workdir or a config file; default :data:`GENERATOR_TOKENIZER`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nativetok_jax import checkpoints, sharding, storage, tasks
from nativetok_jax.bench.compare import override_field
from nativetok_jax.bench.diffusion import LatentBench, _grain_shape, latent_shape
from nativetok_jax.bench.diffusion import _build as build_diffusion_state  # noqa: F401 - tests build a concrete state
from nativetok_jax.config import ConfigError, load_config_file
from nativetok_jax.diffusion.gaussian import build_diffusion
from nativetok_jax.generation.masked import decode_step as maskgit_decode_step
from nativetok_jax.layers.partitioning import axis_rules, shard_spec_for
from nativetok_jax.models.d2it import grain_router
from nativetok_jax.models.d2it.dvae import DVAEConfig
from nativetok_jax.models.generators.gpt import CACHE_AXES
from nativetok_jax.models.nativetok import build_model, id_count
from nativetok_jax.storage import write_json, write_text
from nativetok_jax.training import hnt
from nativetok_jax.training.adversarial import build_discriminator, uses_discriminator
from nativetok_jax.training.dvae_trainer import build_dvae_state, dvae_objective
from nativetok_jax.training.generator_trainer import (
    build_generator_state,
    generator_batch_shardings,
    generator_objective,
)
from nativetok_jax.training.networks import load_networks
from nativetok_jax.training.state import BuiltState, build_state
from nativetok_jax.training.step import TrainStep, batch_shardings, make_train_step
from nativetok_jax.training.tokenizer_objective import image_batch_shardings, tokenizer_train_step

GiB = 2**30
Built = TypeVar("Built")
# Peak dense bf16 FLOP/s and HBM per chip, by the topology name's prefix. Source: Google Cloud TPU
# system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), as of 2026-12.
CHIPS = {
    "v4": dict(peak_flops=275e12, hbm_bytes=32 * GiB, accelerator="v4-{cores}"),
    "v5e": dict(peak_flops=197e12, hbm_bytes=16 * GiB, accelerator="v5litepod-{chips}"),
    "v5p": dict(peak_flops=459e12, hbm_bytes=95 * GiB, accelerator="v5p-{cores}"),
    "v6e": dict(peak_flops=918e12, hbm_bytes=32 * GiB, accelerator="v6e-{chips}"),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# The tokenizer whose ids a generator config models when ``generator.tokenizer`` names none (the
# paper's LlamaGen-B runs on NativeTok-128's ids): its token count and codebook size shape the model.
GENERATOR_TOKENIZER = "configs/nativetok.py:128"
# ImageNet's classes, for a generator config that leaves ``num_classes`` to the data (0).
DEFAULT_CLASSES = 1000


def topology_of_accelerator(accelerator_type: str) -> str:
    """The topology name of a Cloud TPU accelerator type: ``v5litepod-16`` -> ``v5e:4x4``,
    ``v5p-8`` (cores) -> ``v5p:2x2x1``, ``v6e-256`` -> ``v6e:16x16``, ``v4-128`` -> ``v4:4x4x4``.

    Raises:
      CompileError: a type not of these forms (one line).
    """
    match = re.fullmatch(r"(v5litepod|v5e|v6e|v5p|v4)-(\d+)", accelerator_type)
    planar = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
    cubic = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
    if match:
        family, count = match.group(1), int(match.group(2))
        if family in ("v5litepod", "v5e", "v6e") and count in planar:
            return f"{'v6e' if family == 'v6e' else 'v5e'}:{planar[count]}"
        if family in ("v5p", "v4") and count % 2 == 0 and count // 2 in cubic:  # the type counts cores
            return f"{family}:{cubic[count // 2]}"
    raise CompileError(f"--accelerator_type {accelerator_type!r}: not a known slice (e.g. v5litepod-16, v5p-8, "
                       "v6e-256, v4-128); give --topology instead")


class CompileError(ValueError):
    """A config, topology or batch this command cannot compile (one line)."""


# ------------------------------------------------------------------------------------ topology

def topology_devices(name: str) -> tuple[list[Any], dict[str, Any]]:
    """The devices of TPU topology ``name`` (``v5p:2x2x1``) and its chip's row of :data:`CHIPS`.

    Raises:
      CompileError: an unknown chip, a topology libtpu rejects, or libtpu not installed.
    """
    chip = name.split(":")[0]
    if chip not in CHIPS or ":" not in name:
        raise CompileError(f"--topology {name!r}: expected CHIP:SHAPE with CHIP one of {', '.join(CHIPS)} "
                           "(e.g. v5p:2x2x1, v5e:16x16)")
    chips = math.prod(int(n) for n in name.split(":")[1].split("x") if n.isdigit())
    # libtpu's start-up reads a TPU VM's environment (metadata server, worker names) and warns
    # when it is absent: on a machine that only compiles, these say "one host, no metadata".
    # Set only where unset, so a real TPU VM's own values stand; the lockfile check would refuse a
    # second process that merely compiles.
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                       ("TPU_HOST_BOUNDS", "1,1,1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                       ("TPU_ACCELERATOR_TYPE", CHIPS[chip]["accelerator"].format(chips=chips, cores=2 * chips))):
        os.environ.setdefault(key, value)
    from jax.experimental import topologies  # noqa: PLC0415 - loads libtpu: only this command needs it

    try:
        devices = list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as error:  # noqa: BLE001 - libtpu's errors are many kinds of runtime error
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "TPU support not installed" in first:
            first = "libtpu is not installed (pip install -e '.[tpu]' -c requirements.txt)"
        raise CompileError(f"--topology {name!r}: {first}") from None
    return devices, CHIPS[chip]


# ------------------------------------------------------------------------- the abstract train step

def _abstract_built(build: Callable[[], Built]) -> Built:
    """``build()`` traced, never run: its state's arrays are ``ShapeDtypeStruct``\\ s with their
    shardings (``sharding.abstract_initialization``), so TPU devices need no runtime."""
    with sharding.abstract_initialization():
        return build()


def _abstract_discriminator(config: ml_collections.ConfigDict, mesh: Any, rules: Any):
    with sharding.abstract_initialization():
        return build_discriminator(config, config.train.num_steps, mesh, rules)


def _abstract_networks(config: ml_collections.ConfigDict):
    box: dict[str, Any] = {}

    def traced():
        box["networks"] = load_networks(config, random_weights=True)
        return box["networks"].arrays

    arrays = jax.eval_shape(traced)
    return dataclasses.replace(box["networks"], arrays=arrays)


def parts_of(config: ml_collections.ConfigDict) -> Callable[..., Any] | LatentBench:
    """``config``'s task's benchmark parts (``tasks.Task.bench``): :data:`TOKENIZER` or a
    ``bench.diffusion.LatentBench``.

    Raises:
      CompileError: a task whose step this command cannot compile yet (one line).
    """
    task = tasks.of(config)
    if task.bench is None:
        raise CompileError(f"task {task.name!r}: compiling its step is not supported yet (supported: "
                           f"{', '.join(tasks.with_part('bench'))})")
    return task.load("bench")


def _tokenizer_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: Any, batch_size: int,
                    stage: ml_collections.ConfigDict | None) -> tuple[TrainStep, BuiltState, dict[str, Any], dict[str, Any]]:
    """The tokenizer trainer's step, its abstract state, the batch's shapes and its shardings."""
    frozen = tuple(stage.frozen) if stage is not None else ()
    num_old = stage.get("num_old_tokens", 0) if stage is not None else 0
    built = _abstract_built(lambda: build_state(
        lambda r: build_model(config.model, r), train=config.train, mesh=mesh, rules=rules,
        freeze=(lambda p: hnt.trainable_mask(p, frozen, num_old)) if frozen else None))
    discriminator = None
    if uses_discriminator(config):
        discriminator, part, part_shardings = _abstract_discriminator(config, mesh, rules)
        built.add_part("discriminator", part, part_shardings)
    step = tokenizer_train_step(
        built, config, batch_size, networks=_abstract_networks(config), discriminator=discriminator,
        frozen_experts=hnt.frozen_expert_count(frozen, num_old, config.model.num_tokens) if frozen else 0)
    size = config.model.image_size
    shapes = {"image": ((batch_size, size, size, 3), jnp.uint8), "label": ((batch_size,), jnp.int32)}
    shardings = image_batch_shardings(mesh, config, batch_size)
    return step, built, shapes, shardings


TOKENIZER = _tokenizer_step  # the tokenizer's tasks.Task.bench


def generator_tokenizer(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """``(num_tokens, codebook_size)`` of the tokenizer a generator config models (``num_tokens``: its
    code's length, the mean-colour shortcut's ids included): ``generator.tokenizer``
    as a trained workdir (its ``config.json``) or a config file (``configs/nativetok.py:64``), else
    :data:`GENERATOR_TOKENIZER`.

    Raises:
      CompileError: a tokenizer that cannot be read (one line).
    """
    name = config.generator.get("tokenizer", "") or GENERATOR_TOKENIZER
    try:
        tokenizer = load_config_file(name) if ".py" in name else checkpoints.read_config(name)
        return id_count(tokenizer.model), int(tokenizer.model.quantizer.codebook_size)
    except Exception as error:  # noqa: BLE001 - a config file's or workdir's errors are many kinds
        text = str(error).strip()
        raise CompileError(f"generator.tokenizer {name!r}: {text.splitlines()[0] if text else type(error).__name__}") from None


def _abstract_generator(config: ml_collections.ConfigDict, mesh: Any, rules: Any) -> tuple[BuiltState, int]:
    """The generator's abstract state and its token count."""
    num_tokens, vocab_size = generator_tokenizer(config)
    built = _abstract_built(lambda: build_generator_state(
        config, mesh, rules, vocab_size=vocab_size, num_tokens=num_tokens,
        num_classes=config.generator.num_classes or DEFAULT_CLASSES))
    return built, num_tokens


def dvae_router(config: ml_collections.ConfigDict) -> grain_router.GrainRouter:
    """The DVAE config's router; with entropy routing and no readable thresholds file (they are
    measured on the training data), placeholder thresholds: they are constants of the program, so
    its shapes, memory and cost are the same."""
    model_config = DVAEConfig.from_model_config(config.model)
    try:
        return model_config.router()
    except (grain_router.GrainError, OSError):
        placeholder = tuple(float(i + 1) for i in range(len(model_config.factors) - 1))
        return grain_router.GrainRouter(model_config.factors, model_config.entropy_settings, "entropy", placeholder)


def _generator_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: Any, batch_size: int,
                    stage: ml_collections.ConfigDict | None) -> tuple[TrainStep, BuiltState, dict[str, Any], dict[str, Any]]:
    """The generator trainer's step (AR or MaskGIT), its abstract state, the ids' shapes and shardings."""
    del stage  # a generator has no HNT stages
    built, num_tokens = _abstract_generator(config, mesh, rules)
    shardings = generator_batch_shardings(mesh, batch_size, num_tokens)
    step = make_train_step(generator_objective(built.graphdef, config.generator), built, shardings,
                           seed=config.train.seed, ema_decay=config.train.ema_decay)
    shapes = {"ids": ((batch_size, num_tokens), jnp.int32), "label": ((batch_size,), jnp.int32)}
    return step, built, shapes, shardings


def _dvae_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: Any, batch_size: int,
               stage: ml_collections.ConfigDict | None) -> tuple[TrainStep, BuiltState, dict[str, Any], dict[str, Any]]:
    """The DVAE trainer's step, its abstract state, the images' shapes and shardings."""
    del stage  # a DVAE has no HNT stages
    built, discriminator = _abstract_built(lambda: build_dvae_state(config, mesh, rules))
    objective = dvae_objective(built.graphdef, config, dvae_router(config), _abstract_networks(config), discriminator)
    shardings = image_batch_shardings(mesh, config, batch_size)
    step = make_train_step(objective, built, shardings, seed=config.train.seed, ema_decay=config.train.ema_decay)
    size = config.model.image_size
    shapes = {"image": ((batch_size, size, size, 3), jnp.uint8), "label": ((batch_size,), jnp.int32)}
    return step, built, shapes, shardings


GENERATOR = _generator_step  # the generator's tasks.Task.bench
DVAE = _dvae_step  # the DVAE's tasks.Task.bench


def abstract_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, batch_size: int,
                        stage: ml_collections.ConfigDict | None = None) -> tuple[TrainStep, BuiltState, dict[str, Any]]:
    """The loop's ``TrainStep`` for ``config`` on ``mesh``, its abstract state and an abstract batch
    of global size ``batch_size`` (``ShapeDtypeStruct``\\ s with shardings); ``stage`` is an HNT
    stage (``hnt.stage_list``) whose frozen parts the step leaves untrained."""
    rules = sharding.rules_of(config)
    parts = parts_of(config)
    if isinstance(parts, LatentBench):  # DiT or D²iT on latents, as bench diffusion builds them
        built = _abstract_built(lambda: parts.build(config, mesh, rules))
        diffusion = build_diffusion(config.model.diffusion.schedule, config.model.diffusion.num_steps,
                                    learn_sigma=config.model.learn_sigma)
        one = parts.random_batch(config, 1)
        shapes = {name: ((batch_size, *value.shape[1:]), value.dtype) for name, value in one.items()}
        shardings = batch_shardings(mesh, {name: shape for name, (shape, _) in shapes.items()})
        step = make_train_step(parts.objective(built.graphdef, diffusion, config), built, shardings,
                               seed=config.train.seed, ema_decay=config.train.ema_decay)
    else:
        step, built, shapes, shardings = parts(config, mesh, rules, batch_size, stage)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[name]) for name, (shape, dtype) in shapes.items()}
    return step, built, batch


# ------------------------------------------------------------------------------- FLOPs of a jaxpr

def _dot_flops(eqn: Any) -> float:
    if eqn.primitive.name == "dot_general":
        (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
        return 2.0 * math.prod(lhs) * math.prod(rhs_free)
    if eqn.primitive.name == "conv_general_dilated":
        out = eqn.outvars[0].aval.shape
        kernel = eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
        per_output = math.prod(kernel) / kernel[spec[0]]  # in features / groups x kernel window
        return 2.0 * math.prod(out) * per_output
    return 0.0


def _sub_jaxprs(value: Any) -> list[Any]:
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jax.extend.core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def matmul_flops(jaxpr: Any, loops: bool = True) -> float:
    """Matrix-product FLOPs (``2 m n k`` per ``dot_general``, the same per convolution output)
    of ``jaxpr``: every nested jaxpr counted, a scan's body ``length`` times (once when ``loops``
    is False, as XLA's cost analysis does), a ``cond``'s costliest branch."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _dot_flops(eqn)
        subs = [j for value in eqn.params.values() for j in _sub_jaxprs(value)]
        if not subs:
            continue
        counts = [matmul_flops(j, loops) for j in subs]
        if eqn.primitive.name == "cond":
            total += max(counts)
        elif eqn.primitive.name == "scan" and loops:
            total += eqn.params["length"] * sum(counts)
        else:
            total += sum(counts)
    return total


def without_remat(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with every ``remat`` field (at any depth) False."""
    copy = ml_collections.ConfigDict(config.to_dict())

    def clear(node: Any) -> None:
        for key in list(node.keys()):
            if key == "remat" and isinstance(node[key], bool):
                node[key] = False
            elif isinstance(node[key], ml_collections.ConfigDict):
                clear(node[key])

    clear(copy)
    return copy


# ----------------------------------------------------------------------------- HLO collectives

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _type_bytes(text: str) -> float:
    return sum(_DTYPE_BYTES.get(d, 1 if d.startswith("f8") else 4) * math.prod(int(n) for n in dims.split(",") if n)
               for d, dims in _ARRAY.findall(text))


def _trip_count(condition: list[str]) -> int:
    """A scan's while loop runs while ``counter < N``: the largest integer constant of its
    condition computation (1 when it has none)."""
    constants = [int(n) for line in condition for n in re.findall(r"s32\[\][^=]*?constant\((\d+)\)", line)]
    return max(constants, default=1)


def hlo_instructions(hlo: str) -> tuple[list[tuple[str, str, str, float]], dict[str, float]]:
    """Every instruction the entry computation of the optimised HLO text ``hlo`` runs, as
    ``(op, result type, the text after "op(", times run per step)``: a while loop's body counts
    its trip count (:func:`_trip_count`) times, called computations (``call``, ``conditional``)
    are entered; fusions' insides are not. Also the bytes of every named result."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            match = _COMPUTATION.match(line)
            if match:
                current = match.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
                continue
        if current is not None and line.strip() and line.strip() != "}":
            computations[current].append(line)
    sizes: dict[str, float] = {}
    parsed: dict[str, list[tuple[str, str, str]]] = {}
    for name, lines in computations.items():
        parsed[name] = []
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match:
                result, type_text, op, rest = match.groups()
                sizes[result] = _type_bytes(type_text)
                parsed[name].append((op, type_text, rest))
    run: list[tuple[str, str, str, float]] = []

    def visit(name: str, times: float, depth: int = 0) -> None:
        if depth > 64 or name not in parsed:
            return
        for op, type_text, rest in parsed[name]:
            run.append((op, type_text, rest, times))
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest)
                condition = re.search(r"condition=%?([\w.\-]+)", rest)
                if body:
                    visit(body.group(1), times * _trip_count(computations.get(condition.group(1), []) if condition
                                                             else []), depth + 1)
            elif op in ("call", "conditional"):
                for callee in re.findall(r"(?:to_apply|branch_computations=\{[^}]*|true_computation|"
                                         r"false_computation)=?%([\w.\-]+)", rest):
                    visit(callee, times, depth + 1)

    if entry is not None:
        visit(entry, 1.0)
    return run, sizes


def collective_bytes(hlo: str) -> dict[str, float]:
    """Operand bytes of every collective in the optimised HLO text ``hlo``, by kind (async
    ``-start`` forms counted as their kind, ``-done`` not), times run per step."""
    run, sizes = hlo_instructions(hlo)
    totals = {kind: 0.0 for kind in COLLECTIVES}
    for op, _, rest, times in run:
        kind = op[:-len("-start")] if op.endswith("-start") else op
        if kind in totals:
            operands = rest.split(")")[0]
            inline = _type_bytes(operands)
            totals[kind] += times * (inline or sum(sizes.get(n, 0.0) for n in re.findall(r"%([\w.\-]+)", operands)))
    return totals


def cycles_loop_scale(hlo: str) -> float:
    """The TPU compiler's own cycle estimates (``estimated_cycles`` of each fusion's backend
    config) summed with every loop body times its trip count, over the same sum counting each
    body once: how much more the whole step costs than XLA's cost analysis, which counts loop
    bodies once. 1 when the program has no such estimates."""
    run, _ = hlo_instructions(hlo)
    once = every = 0.0
    for _, _, rest, times in run:
        cycles = re.search(r'"estimated_cycles":"(\d+)"', rest)
        if cycles:
            once += int(cycles.group(1))
            every += times * int(cycles.group(1))
    return every / once if once else 1.0


# ---------------------------------------------------------------------------------- one compile

def _analyses(compiled: Any) -> tuple[int, dict[str, float]]:
    memory = compiled.memory_analysis()
    hbm = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
           - memory.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return int(hbm), dict(cost or {})


def _costed_seconds(optimal_seconds: float) -> tuple[int, float]:
    """XLA's TPU cost model adds -1 s for each operation it cannot cost (seen: an f32
    all-gather; a bf16 one is costed), so ``optimal_seconds`` of a program with ``n`` of them is
    its estimate minus ``n``. Returns ``(n, the estimate of the costed operations)``, assuming that
    estimate is under a second (a program whose loop bodies count once, on one chip)."""
    if not optimal_seconds < 0:
        return 0, optimal_seconds
    uncosted = math.ceil(-optimal_seconds)
    return uncosted, optimal_seconds + uncosted


def _out_of_memory(error: Exception) -> str | None:
    text = str(error)
    if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower():
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return next((line for line in lines if "memory" in line.lower()), lines[0])[:300]
    return None


def compile_train(config: ml_collections.ConfigDict, devices: list[Any], chip: dict[str, Any], batch_size: int,
                  stage: ml_collections.ConfigDict | None = None, save_hlo: str = "") -> dict[str, Any]:
    """One row: the train step of ``config`` at global batch ``batch_size`` compiled for ``devices``
    (``save_hlo``: a file to write the optimised HLO text to)."""
    if batch_size < 1:
        raise CompileError(f"global batch {batch_size}: must be at least 1")
    mesh = sharding.make_mesh(config.mesh, devices)
    chips = len(devices)
    row: dict[str, Any] = dict(chips=chips, global_batch=batch_size, mesh=dict(mesh.shape),
                               hbm_capacity_bytes=chip["hbm_bytes"])
    start = time.perf_counter()
    step, built, batch = abstract_train_step(config, mesh, batch_size, stage)
    traced = step.trace(built.state, batch).jaxpr
    all_iterations, bodies_once = matmul_flops(traced), matmul_flops(traced, loops=False)
    try:
        compiled = step.lower(built.state, batch).compile()
    except Exception as error:  # noqa: BLE001 - only running out of memory is an answer
        reason = _out_of_memory(error)
        if reason is None:
            raise
        row.update(compile_s=time.perf_counter() - start, fits=False, reason=f"XLA refused: {reason}")
        return row
    row["compile_s"] = time.perf_counter() - start
    hbm, cost = _analyses(compiled)
    counting = without_remat(config)
    no_remat_step, no_remat_built, no_remat_batch = abstract_train_step(counting, mesh, batch_size, stage)
    model_flops = matmul_flops(no_remat_step.trace(no_remat_built.state, no_remat_batch).jaxpr) / chips
    loop_scale = all_iterations / bodies_once if bodies_once else 1.0
    xla_flops, xla_seconds = float(cost.get("flops", float("nan"))), float(cost.get("optimal_seconds", float("nan")))
    uncosted, seconds = _costed_seconds(xla_seconds)
    hlo = compiled.as_text()
    if save_hlo:
        write_text(save_hlo, hlo)
    cycles_scale = cycles_loop_scale(hlo)
    estimated = seconds * cycles_scale
    fits = hbm <= chip["hbm_bytes"]
    row.update(
        hbm_per_chip_bytes=hbm, fits=fits,
        reason="" if fits else f"needs {hbm / GiB:.2f} GiB per chip, the chip has {chip['hbm_bytes'] / GiB:.0f} GiB",
        hardware_flops_per_chip=xla_flops * loop_scale, model_flops_per_chip=model_flops,
        traced_matmul_flops_per_chip=all_iterations / chips, loop_scale=loop_scale, cycles_loop_scale=cycles_scale,
        xla_flops_loop_bodies_once=xla_flops, xla_optimal_seconds_loop_bodies_once=xla_seconds,
        xla_uncosted_ops=uncosted,
        estimated_step_s=estimated, estimated_mfu=model_flops / (estimated * chip["peak_flops"]) if estimated else None,
        collective_bytes=collective_bytes(hlo),
        param_bytes_per_chip=_bytes_per_chip(built.state["params"]),
        opt_state_bytes_per_chip=_bytes_per_chip(built.state["opt_state"]),
    )
    return row


def _bytes_per_chip(tree: Any) -> int:
    """Bytes one chip holds of ``tree`` (abstract arrays with shardings)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
    return total


def largest_batch(compile_row: Callable[[int], dict[str, Any]], batch_size: int) -> tuple[int | None, list[dict[str, Any]]]:
    """Doubles ``batch_size`` while ``compile_row(batch)["fits"]``: the largest that fits (None if
    not even ``batch_size``) and every row compiled."""
    rows, best = [], None
    while True:
        row = compile_row(batch_size)
        rows.append(row)
        print(f"  batch {batch_size}: {'fits' if row['fits'] else 'does not fit'} "
              f"({_gib(row.get('hbm_per_chip_bytes'))} GiB per chip)", flush=True)
        if not row["fits"]:
            return best, rows
        best, batch_size = batch_size, 2 * batch_size


# ------------------------------------------------------------------------------ sampling steps

def has_sampler(config: ml_collections.ConfigDict) -> bool:
    """Whether ``--sampler`` compiles a sampling step for ``config``'s task (generators, DiT, D²iT)."""
    parts = parts_of(config)
    return isinstance(parts, LatentBench) or parts is GENERATOR


def _sampler_call(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: Any,
                  num_images: int) -> tuple[str, Callable[..., Any], tuple[Any, ...], tuple[int, ...]]:
    """``(what, fn, abstract args, donated argument numbers)`` of one guided sampling step of
    ``config``'s model for ``num_images`` images (``2 num_images`` rows with guidance): a DiT/D²iT
    network call; an AR generator's decode step of one position with its key/value cache (the
    cache in and out, donated, as the sampler's loop carries it); a MaskGIT step over every position."""
    parts = parts_of(config)
    if not has_sampler(config):
        raise CompileError(f"--sampler: a {tasks.of(config).name} config has no sampler")
    rows = 2 * num_images
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, shape))  # noqa: E731
    labels = spec((rows,), jnp.int32)
    if parts is GENERATOR:
        built, num_tokens = _abstract_generator(config, mesh, rules)
        graphdef, params = built.graphdef, built.state["params"]
        g = config.generator
        if g.kind == "ar":
            def abstract_cache():
                return nnx.merge(graphdef, params).init_cache(rows, num_tokens)

            with jax.set_mesh(mesh), axis_rules(rules):
                cache = jax.eval_shape(abstract_cache)
            axis_sizes = dict(mesh.shape)
            cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(
                mesh, shard_spec_for(CACHE_AXES, a.shape, rules, axis_sizes))), cache)
            position = jax.ShapeDtypeStruct((), jnp.int32, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            fn = lambda p, ids, position, cache: nnx.merge(graphdef, p).decode_step(ids, position, cache)  # noqa: E731
            return "AR decode step with its KV cache, guidance", fn, (params, labels, position, cache), (3,)
        ids = spec((num_images, num_tokens), jnp.int32)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        step_index = jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar.sharding)

        def maskgit_step(p, ids, labels, step, temperature, choice_temperature, guidance_scale):
            return maskgit_decode_step(
                nnx.merge(graphdef, p), ids, labels, jax.random.key(0), step, num_steps=g.sample.num_steps,
                temperature=temperature, choice_temperature=choice_temperature, guidance_scale=guidance_scale,
                guided=True, random_order=False, top_k=0, top_p=None)

        return ("MaskGIT step with guidance", maskgit_step,
                (params, ids, spec((num_images,), jnp.int32), step_index, scalar, scalar, scalar), (1,))
    built = _abstract_built(lambda: parts.build(config, mesh, rules))
    x = spec((rows, *latent_shape(config)), jnp.float32)
    t, y = spec((rows,), jnp.int32), labels
    graphdef = built.graphdef
    if parts.grain_maps:
        g = spec((rows, *_grain_shape(config)), jnp.int32)
        fn = lambda p, x, t, y, g: nnx.merge(graphdef, p).content(x, t, y, g)  # noqa: E731
        return "network call with guidance", fn, (built.state["params"], x, t, y, g), ()
    fn = lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y)  # noqa: E731
    return "network call with guidance", fn, (built.state["params"], x, t, y), ()


def compile_sampler(config: ml_collections.ConfigDict, devices: list[Any], chip: dict[str, Any],
                    num_images: int) -> dict[str, Any]:
    """One guided sampling step of ``config``'s model (:func:`_sampler_call`) for ``num_images``
    images, on the EMA parameters' shardings, compiled for ``devices``."""
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_of(config)
    start = time.perf_counter()
    what, fn, args, donated = _sampler_call(config, mesh, rules, num_images)
    row = dict(sampler=what, num_images=num_images, chips=len(devices), hbm_capacity_bytes=chip["hbm_bytes"])
    try:
        with jax.set_mesh(mesh), axis_rules(rules):
            compiled = jax.jit(fn, donate_argnums=donated).lower(*args).compile()
    except Exception as error:  # noqa: BLE001 - only running out of memory is an answer
        reason = _out_of_memory(error)
        if reason is None:
            raise
        return dict(row, fits=False, reason=f"XLA refused: {reason}", compile_s=time.perf_counter() - start)
    hbm, cost = _analyses(compiled)
    seconds = _costed_seconds(float(cost.get("optimal_seconds", float("nan"))))[1] * cycles_loop_scale(compiled.as_text())
    return dict(row, hbm_per_chip_bytes=hbm, fits=hbm <= chip["hbm_bytes"], compile_s=time.perf_counter() - start,
                estimated_call_s=seconds)


# -------------------------------------------------------------------------------------- command

def load(spec: str, overrides: list[str]) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict | None]:
    """``FILE[:ARG][@STAGE]``: the config (``--set`` applied) and the HNT stage named (or None)."""
    spec, _, stage_name = spec.partition("@")
    try:
        config = load_config_file(spec)
    except Exception as error:  # noqa: BLE001 - a config file's own errors are many kinds
        raise CompileError(f"--configs {spec}: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from None
    for assignment in overrides:
        override_field(config, assignment)
    parts_of(config)
    if not stage_name:
        return config, None
    stages = hnt.stage_list(config)
    names = [s.name for s in stages]
    if stage_name not in names:
        raise CompileError(f"--configs {spec}@{stage_name}: no such HNT stage (stages: {', '.join(map(str, names))})")
    index = names.index(stage_name)
    stage = ml_collections.ConfigDict(stages[index].to_dict())
    stage.num_old_tokens = stages[index - 1].num_tokens if index else 0
    return hnt.stage_config(config, stages[index]), stage


def split_specs(text: str) -> list[str]:
    """``--configs``: comma-separated ``FILE.py[:ARG][@STAGE]``; a piece without ``.py`` belongs to
    the argument before it (``configs/recipe.py:nativetok,128@proxy_codes`` is one config)."""
    specs: list[str] = []
    for piece in text.split(","):
        if specs and ".py" not in piece:
            specs[-1] += "," + piece
        elif piece:
            specs.append(piece)
    return specs


def _gib(value: Any) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def print_row(row: dict[str, Any], header: bool) -> None:
    if header:
        print(f"{'config':>34} {'chips':>5} {'batch':>6} {'HBM GiB/chip':>12} {'fits':>5} {'est. step s':>11} "
              f"{'est. MFU':>8} {'model TF/chip':>13} {'HW TF/chip':>10} {'coll. GiB':>9} {'compile s':>9}")
    moved = sum((row.get("collective_bytes") or {}).values())
    mfu = row.get("estimated_mfu")
    print(f"{row['config']:>34} {row['chips']:>5} {row['global_batch']:>6} {_gib(row.get('hbm_per_chip_bytes')):>12} "
          f"{str(row['fits']):>5} {row.get('estimated_step_s', float('nan')):>11.4f} "
          f"{'-' if mfu is None else f'{mfu:.3f}':>8} {row.get('model_flops_per_chip', float('nan')) / 1e12:>13.2f} "
          f"{row.get('hardware_flops_per_chip', float('nan')) / 1e12:>10.2f} {moved / GiB:>9.2f} "
          f"{row['compile_s']:>9.1f}", flush=True)
    if not row["fits"]:
        print(f"{'':>34} does not fit: {row['reason']}", flush=True)


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m nativetok_jax.bench compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", required=True,
                        help="comma-separated config files[:arg][@HNT stage name], e.g. configs/dit.py:XL")
    parser.add_argument("--topology", default="", help="TPU topology, e.g. v5p:2x2x1, v5e:16x16, v4:4x4x4")
    parser.add_argument("--accelerator_type", default="",
                        help="or the Cloud TPU slice type (v5litepod-16, v5p-8, ...) to take the topology from")
    parser.add_argument("--require_fit", action="store_true",
                        help="exit with one line (status 1) when a config does not fit (the launcher's pre-flight)")
    parser.add_argument("--batch_sizes", default="",
                        help="global batch, one per config or one for all (default: each config's train.batch_size)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of every config (a Python literal), e.g. model.remat=True")
    parser.add_argument("--largest_batch", action="store_true",
                        help="double each batch while the step fits; report the largest that fits")
    parser.add_argument("--sampler", action="store_true",
                        help="also search the largest number of images (from the batch size up) of one guided "
                             "sampling step (DiT/D2iT network call, AR decode step with its cache, MaskGIT step)")
    parser.add_argument("--out", default="bench_results/compile.json")
    parser.add_argument("--save_hlo", default="", help="a directory to write each compiled step's optimised HLO to")
    args = parser.parse_args(argv)
    storage.check_writable(args.out, "--out")  # in seconds, not after the runs it is to hold
    try:
        return _run(args)
    except CompileError as error:
        raise SystemExit(f"error: {error}") from None


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if bool(args.topology) == bool(args.accelerator_type):
        raise CompileError("give one of --topology (v5p:2x2x1) or --accelerator_type (v5p-8)")
    if args.accelerator_type:
        args.topology = topology_of_accelerator(args.accelerator_type)
    specs = split_specs(args.configs)
    loaded = [load(spec, args.set) for spec in specs]  # every config checked before anything compiles
    if args.batch_sizes:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        if len(sizes) == 1:
            sizes *= len(specs)
        if len(sizes) != len(specs):
            raise CompileError(f"--batch_sizes: one per config ({len(specs)}) or one for all, got {args.batch_sizes!r}")
    else:
        sizes = [int(config.train.batch_size) for config, _ in loaded]
    devices, chip = topology_devices(args.topology)
    report: dict[str, Any] = dict(benchmark="compile", topology=args.topology, chips=len(devices),
                                  device_kind=devices[0].device_kind, jax_version=jax.__version__,
                                  peak_flops_per_chip=chip["peak_flops"], hbm_capacity_bytes=chip["hbm_bytes"],
                                  estimate="XLA cost model (optimal_seconds), not a measurement",
                                  date=time.strftime("%Y-%m-%d"), rows=[], samplers=[])
    print(f"{args.topology}: {len(devices)} x {devices[0].device_kind}, peak {chip['peak_flops'] / 1e12:.0f} TFLOP/s "
          f"bf16, {chip['hbm_bytes'] / GiB:.0f} GiB HBM per chip; step times and MFU are XLA's estimates")
    for spec, (config, stage), batch_size in zip(specs, loaded, sizes):
        def compile_row(batch: int, config=config, stage=stage, spec=spec) -> dict[str, Any]:
            hlo = ""
            if args.save_hlo:
                name = re.sub(r"[^\w.@-]+", "_", f"{spec}_{args.topology}_{batch}")
                hlo = os.path.join(args.save_hlo, f"{name}.hlo.txt")
            return dict(config=spec, topology=args.topology, **compile_train(config, devices, chip, batch, stage, hlo))

        try:
            if args.largest_batch:
                best, rows = largest_batch(compile_row, batch_size)
                row = next((r for r in rows if r["global_batch"] == best), rows[-1])
                row = dict(row, largest_batch=best)
            else:
                row = compile_row(batch_size)
        except Exception as error:
            if isinstance(error, (CompileError, ConfigError)):
                raise CompileError(f"{spec}: {error}") from None
            raise
        report["rows"].append(row)
        print_row(row, header=len(report["rows"]) == 1)
        write_json(args.out, report)
        if args.require_fit and not row["fits"]:
            raise CompileError(f"{spec} does not fit on {args.topology} at global batch {row['global_batch']}: "
                               f"{row['reason']}")
        if args.sampler and has_sampler(config):
            best, rows = largest_batch(lambda n, config=config: compile_sampler(config, devices, chip, n), batch_size)
            report["samplers"].append(dict(config=spec, largest_images=best, rows=rows))
            print(f"{spec}: sampler ({rows[0]['sampler']}) fits up to {best} images", flush=True)
            write_json(args.out, report)
    print(f"wrote {args.out}")
    return report
