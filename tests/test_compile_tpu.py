"""``bench compile``: the loop's train step compiled ahead of time for a TPU topology (libtpu on a
CPU-only machine), its memory, FLOPs and the reasons a batch does not fit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nativetok_jax import sharding
from nativetok_jax.bench import aot
from nativetok_jax.config import DEFAULT_RULES, load_config_file
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.layers.transformer import BlockStack
from nativetok_jax.training import step as step_module

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
# A DiT of the demo's structure at 8 px, 2 layers of width 32: compiles in seconds.
TINY = ["model.image_size=8", "model.patch_size=2", "model.width=32", "model.depth=2", "model.num_heads=2"]


def tiny_dit():
    config = load_config_file(os.path.join(ROOT, "configs", "dit_demo.py"))
    for assignment in TINY:
        aot.override_field(config, assignment)
    return config


needs_libtpu = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]' -c requirements.txt): nothing to compile for TPU with")


@needs_libtpu
def test_a_tiny_config_compiles_for_v5e_with_every_field_and_an_impossible_batch_does_not_fit(tmp_path):
    out = str(tmp_path / "compile.json")
    sets = [a for assignment in TINY for a in ("--set", assignment)]
    report = aot.run(["--configs", "configs/dit_demo.py", "--topology", "v5e:2x2", "--batch_sizes", "8",
                      "--out", out, *sets])
    assert json.load(open(out))["rows"] == json.loads(json.dumps(report["rows"]))
    row = report["rows"][0]
    assert report["device_kind"] == "TPU v5 lite" and report["chips"] == row["chips"] == 4
    assert row["config"] == "configs/dit_demo.py" and row["topology"] == "v5e:2x2" and row["global_batch"] == 8
    assert row["hbm_capacity_bytes"] == 16 * 2**30 and 0 < row["hbm_per_chip_bytes"] < 2**30 and row["fits"]
    # Parameters are replicated over the data axis: AdamW's two moments and the EMA, as many bytes.
    assert row["opt_state_bytes_per_chip"] >= 2 * row["param_bytes_per_chip"] > 0
    assert 0 < row["model_flops_per_chip"] <= row["traced_matmul_flops_per_chip"]
    assert row["hardware_flops_per_chip"] > 0 and row["estimated_step_s"] > 0 and 0 < row["estimated_mfu"] < 1
    assert row["loop_scale"] > 1  # the layer scan's body runs twice; XLA's analysis counts it once
    assert set(row["collective_bytes"]) == set(aot.COLLECTIVES) and row["collective_bytes"]["all-reduce"] > 0
    assert row["compile_s"] > 0

    # 2**22 images of 8 x 8 pixels: far more activations than 16 GiB per chip.
    with pytest.raises(SystemExit) as refused:  # the launcher's pre-flight
        aot.run(["--configs", "configs/dit_demo.py", "--accelerator_type", "v5litepod-4", "--batch_sizes",
                 str(2**22), "--out", out, "--require_fit", *sets])
    assert str(refused.value).startswith("error: configs/dit_demo.py does not fit on v5e:2x2 at global batch 4194304: ")
    assert "\n" not in str(refused.value)
    big = json.load(open(out))["rows"][0]
    assert big["fits"] is False and big["reason"] and "\n" not in big["reason"]


@needs_libtpu
def test_a_wrong_topology_config_or_batch_is_one_line():
    for argv, expected in (
        (["--configs", "configs/dit_demo.py", "--topology", "v9x:2x2"], "--topology 'v9x:2x2'"),
        (["--configs", "configs/dit_demo.py", "--topology", "v5e:3x7"], "--topology 'v5e:3x7'"),
        (["--configs", "configs/nope.py", "--topology", "v5e:2x2"], "--configs configs/nope.py"),
        (["--configs", "configs/dit_demo.py,configs/dit_demo.py", "--topology", "v5e:2x2", "--batch_sizes", "1,2,3"],
         "--batch_sizes"),
    ):
        with pytest.raises(SystemExit) as error:
            aot.run(argv)
        assert str(error.value).startswith("error: ") and expected in str(error.value) and "\n" not in str(error.value)


def test_the_compiled_step_is_the_loops_step_with_the_builders_shardings():
    """The abstract state (traced, never initialised) has the shapes and shardings of the state
    the trainer builds, and the step is ``make_train_step``'s jitted function."""
    config = tiny_dit()
    mesh = sharding.make_mesh(config.mesh)
    step, built, batch = aot.abstract_train_step(config, mesh, 8)
    assert step._jitted.__wrapped__.__qualname__ == "make_train_step.<locals>.step"
    assert step._jitted.__wrapped__.__module__ == step_module.__name__
    concrete = aot.build_diffusion_state(config, mesh, sharding.rules_of(config))
    same = jax.tree.map(lambda a, c: (a.shape, a.dtype, a.sharding.spec) == (c.shape, c.dtype, c.sharding.spec),
                        built.state, concrete.state)
    assert all(jax.tree.leaves(same)) and jax.tree.structure(built.state) == jax.tree.structure(concrete.state)
    lowered = step.lower(built.state, batch)
    state_shardings, batch_shardings, _ = lowered.compile().input_shardings[0]
    expected = jax.tree.leaves(concrete.shardings)
    assert [s.spec for s in jax.tree.leaves(state_shardings)] == [s.spec for s in expected]
    assert {k: s.spec for k, s in batch_shardings.items()} == {k: v.sharding.spec for k, v in batch.items()}


def test_model_flops_of_a_small_transformer_equal_the_analytic_count():
    """A scanned pre-LN stack, differentiated in its parameters and input: forward
    ``depth (24 T D^2 + 4 T^2 D)`` per example, backward twice that."""
    batch, tokens, width, depth = 2, 16, 32, 3
    forward = batch * depth * (24 * tokens * width**2 + 4 * tokens**2 * width)
    x = jnp.zeros((batch, tokens, width))
    counts = {}
    for remat in (False, True):
        model = BlockStack(width, depth, 4, 4.0, rngs=nnx.Rngs(0), remat=remat)
        graphdef, params = nnx.split(model)

        def loss(params, x):
            return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

        with axis_rules(DEFAULT_RULES):
            jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x)
        counts[remat] = aot.matmul_flops(jaxpr)
        assert aot.matmul_flops(jaxpr, loops=False) * depth == pytest.approx(counts[remat], rel=1e-6)
    assert counts[False] == 3 * forward
    # The recomputed forward (what model FLOPs leave out), less each layer's last MLP product,
    # whose output no gradient needs.
    assert counts[True] == 4 * forward - batch * depth * 2 * tokens * width * 4 * width


def test_without_remat_clears_every_remat_field():
    config = load_config_file(os.path.join(ROOT, "configs", "nativetok.py:128"))
    assert config.model.experts.remat
    cleared = aot.without_remat(config)
    assert not cleared.model.experts.remat and config.model.experts.remat  # a copy
    assert "remat=True" not in str(cleared)


def test_collective_bytes_read_operands_and_multiply_loop_bodies():
    hlo = """HloModule m

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %c = s32[]{:T(128)} constant(28)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = bf16[4,1024]{1,0} all-gather(%w), dimensions={0}
  %w = bf16[1,1024]{1,0} constant({...})
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %x)
}

ENTRY %main (a: f32[1024]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %ar = f32[1024]{0} all-reduce(%a), to_apply=%add
  %s = (f32[16]{0}, f32[64]{0}) all-gather-start(%b), dimensions={0}
  %b = f32[16]{0} parameter(1)
  %d = f32[64]{0} all-gather-done(%s)
  %loop = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[1024]{0} copy(%ar)
}
"""
    moved = aot.collective_bytes(hlo)
    assert moved["all-reduce"] == 4096
    assert moved["all-gather"] == 16 * 4 + 28 * 1024 * 2  # the started one; the loop's 28 times
    assert moved["reduce-scatter"] == moved["all-to-all"] == moved["collective-permute"] == 0


def test_costed_seconds_undo_the_cost_models_minus_one_per_uncosted_operation():
    assert aot._costed_seconds(-23.99927) == (24, pytest.approx(0.00073))
    assert aot._costed_seconds(0.25) == (0, 0.25)


def test_accelerator_types_name_their_topologies():
    assert aot.topology_of_accelerator("v5litepod-16") == "v5e:4x4"
    assert aot.topology_of_accelerator("v5p-8") == "v5p:2x2x1"  # v5p and v4 types count cores
    assert aot.topology_of_accelerator("v4-128") == "v4:4x4x4"
    assert aot.topology_of_accelerator("v6e-256") == "v6e:16x16"
    with pytest.raises(aot.CompileError, match="--accelerator_type 'v5p-7'"):
        aot.topology_of_accelerator("v5p-7")


def test_a_config_argument_may_hold_commas():
    assert aot.split_specs("configs/dit.py:XL,configs/recipe.py:nativetok,128@proxy_codes,configs/d2it.py:XL") == [
        "configs/dit.py:XL", "configs/recipe.py:nativetok,128@proxy_codes", "configs/d2it.py:XL"]


def test_remat_policies_give_the_same_gradients_and_recompute_what_they_name():
    from nativetok_jax.schema import ConfigError, validate_transformer as _validate_transformer
    from nativetok_jax.layers.remat import POLICIES, rematerialized

    batch, tokens, width, depth = 2, 8, 16, 2
    x = jax.random.normal(jax.random.key(1), (batch, tokens, width))
    forward = batch * depth * (24 * tokens * width**2 + 4 * tokens**2 * width)
    grads, counts = {}, {}
    for remat in (False, *POLICIES):
        graphdef, params = nnx.split(BlockStack(width, depth, 2, 4.0, rngs=nnx.Rngs(0), remat=remat))

        def loss(params, x):
            return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

        with axis_rules(DEFAULT_RULES):
            grads[remat] = jax.grad(loss)(params, x)
            counts[remat] = aot.matmul_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x))
    for remat in POLICIES:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads[remat], grads[False])
    assert counts[False] == counts["dots_saveable"] == 3 * forward
    assert counts["nothing_saveable"] > 3 * forward
    # Keeps every weight product; recomputes only the attention's two (batched) products.
    assert counts["dots_with_no_batch_dims_saveable"] == 3 * forward + batch * depth * 4 * tokens**2 * width
    with pytest.raises(ValueError, match="remat policy 'offload'"):
        rematerialized(lambda h: h, "offload")
    config = load_config_file(os.path.join(ROOT, "configs", "nativetok.py:32"))
    config.model.experts.remat_policy = "everything"
    with pytest.raises(ConfigError, match="model.experts.remat_policy"):
        _validate_transformer(config.model.experts, "model.experts")


@pytest.mark.slow
@needs_libtpu
def test_generators_and_the_dvae_compile_through_their_trainers_builders_with_their_samplers(tmp_path):
    """The AR and MaskGIT generators (shaped by the tokenizer config they name) and the DVAE
    (placeholder thresholds where its file is absent) compile for v5e:2x2, each with the step the
    loop runs; the AR decode step with its cache and the MaskGIT step compile as samplers."""
    out = str(tmp_path / "compile.json")
    report = aot.run(["--configs", "configs/gen_demo.py,configs/gen_demo.py:maskgit", "--topology", "v5e:2x2",
                      "--batch_sizes", "8", "--set", "generator.tokenizer=configs/demo.py", "--out", out])
    for row in report["rows"]:
        assert row["fits"] and row["estimated_step_s"] > 0 and 0 < row["model_flops_per_chip"]
        assert row["collective_bytes"]["all-reduce"] > 0
    devices, chip = aot.topology_devices("v5e:2x2")
    for kind, what in (("ar", "AR decode step with its KV cache, guidance"), ("maskgit", "MaskGIT step with guidance")):
        config = load_config_file(os.path.join(ROOT, "configs", f"gen_demo.py:{kind}"))
        config.generator.tokenizer = "configs/demo.py"
        sampler = aot.compile_sampler(config, devices, chip, 4)
        assert sampler["sampler"] == what and sampler["fits"] and sampler["estimated_call_s"] > 0
    config = load_config_file(os.path.join(ROOT, "configs", "dvae_demo.py"))
    config.model.grain.thresholds = str(tmp_path / "not_measured_yet.json")
    mesh = sharding.make_mesh(config.mesh, devices)
    step, built, batch = aot.abstract_train_step(config, mesh, 8)
    assert step._jitted.__wrapped__.__qualname__ == "make_train_step.<locals>.step"
    row = aot.compile_train(config, devices, chip, 8)
    assert row["fits"] and row["estimated_step_s"] > 0 and batch["image"].shape == (8, 32, 32, 3)
    with pytest.raises(aot.CompileError, match="--sampler: a dvae config has no sampler"):
        aot.compile_sampler(config, devices, chip, 4)


@needs_libtpu
def test_a_generator_whose_tokenizer_cannot_be_read_and_a_set_of_a_missing_section_are_one_line():
    for argv, expected in (
        (["--configs", "configs/gen_demo.py", "--topology", "v5e:2x2", "--batch_sizes", "8"],
         "generator.tokenizer 'workdirs/demo'"),
        (["--configs", "configs/dvae_demo.py", "--topology", "v5e:2x2", "--set", "generator.tokenizer=x"],
         "--set generator.tokenizer: the config has no such field"),
    ):
        with pytest.raises(SystemExit) as error:
            aot.run(argv)
        assert str(error.value).startswith("error: ") and expected in str(error.value) and "\n" not in str(error.value)
