"""The shared training core: masked freezing (no optimiser state, no gradient into frozen
parameters but through them, grad_norm over trainable ones), weight decay by rank, the step run
under the logical-axis rules, the quantiser warm-up and GAN start, preemption, the configs, and a
golden checkpoint layout."""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from conftest import tiny_config
from test_training import finish, start_main, write_config_file
from nativetok_jax import checkpoints, sharding
from nativetok_jax.config import (ConfigError, generator_config, load_config_file, quantizer_warmup_steps,
                                  validate_training)
from nativetok_jax.layers.partitioning import axis_rules
from nativetok_jax.models.nativetok import build_model
from nativetok_jax.models.generators.build import build_generator
from nativetok_jax.training import hnt
from nativetok_jax.training.adversarial import build_discriminator
from nativetok_jax.training.guards import Preempted, ends_preempted_runs
from nativetok_jax.training.optimizer import make_optimizer, optimizer_state_bytes, weight_decay_mask
from nativetok_jax.training.state import build_state
from nativetok_jax.training.step import Objective, StepContext, batch_shardings, make_train_step
from nativetok_jax.training.tokenizer_objective import tokenizer_objective, tokenizer_train_step
from nativetok_jax.training.trainer import CodebookFit

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
CONFIGS = os.path.join(ROOT, "configs")
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "demo_checkpoint_layout.json")


def flat(tree) -> dict:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def abstract_params(config):
    model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
    return sharding.params_of(model), sharding.param_axes(model)


def test_frozen_mit_has_no_optimizer_state():
    config = tiny_config()
    params, axes = abstract_params(config)
    trainable = hnt.trainable_mask(params, ("mit",), 0)
    before = optimizer_state_bytes(jax.eval_shape(make_optimizer(config.train, 10, params, None, axes).init, params))
    after = optimizer_state_bytes(jax.eval_shape(make_optimizer(config.train, 10, params, trainable, axes).init, params))
    mit_bytes = sum(x.size * 4 for x in jax.tree.leaves(params["mit"]))
    print(f"optimiser state, tiny model: {before} bytes training all, {after} bytes with the MIT frozen")
    assert after == before - 2 * mit_bytes  # no Adam moments (mu, nu) for any MIT parameter


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(3, 4, rngs=rngs)
        self.second = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.second(jnp.tanh(self.first(x)))


def test_frozen_parameters_stay_bit_identical_and_are_out_of_grad_norm_and_optimizer_state():
    train = ml_collections.ConfigDict(dict(seed=0, num_steps=5, learning_rate=0.1, final_learning_rate_ratio=1.0,
                                           warmup_steps=0, beta1=0.9, beta2=0.99, weight_decay=0.5,
                                           grad_clip_norm=1e-3, ema_decay=0.9))
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))
    rows = np.array([True, False, True, False]).reshape(4, 1)  # second/kernel: rows 1 and 3 frozen

    def freeze(params):
        return {"first": {"kernel": False, "bias": False}, "second": {"kernel": rows, "bias": True}}

    built = build_state(Toy, train=train, mesh=mesh, rules=(), freeze=freeze)
    x, y = np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3), np.ones((8, 2), np.float32)

    def loss(params, batch, context):
        error = jnp.mean((nnx.merge(built.graphdef, params)(batch["x"]) - batch["y"]) ** 2)
        return error, ({}, None)

    before = jax.tree.map(np.asarray, built.state)
    expected_grads = jax.grad(lambda p: loss(p, {"x": x, "y": y}, None)[0])(before["params"])
    step = make_train_step(Objective(loss), built, batch_shardings(mesh, {"x": (8, 3), "y": (8, 2)}),
                           seed=0, ema_decay=train.ema_decay)
    state, metrics = step(built.state, {"x": x, "y": y})
    after = jax.tree.map(np.asarray, state)
    trainable_grads = [expected_grads["second"]["kernel"] * rows, expected_grads["second"]["bias"]]
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(trainable_grads), rtol=1e-5)
    assert float(optax.tree.norm(expected_grads)) > 1.2 * float(metrics["grad_norm"])  # the frozen ones count here
    for part in ("params", "ema"):
        for name in ("kernel", "bias"):
            np.testing.assert_array_equal(after[part]["first"][name], before[part]["first"][name])
        np.testing.assert_array_equal(after[part]["second"]["kernel"][~rows[:, 0]],
                                      before[part]["second"]["kernel"][~rows[:, 0]])
    assert np.all(after["params"]["second"]["kernel"][rows[:, 0]] != before["params"]["second"]["kernel"][rows[:, 0]])
    # No Adam moments for the wholly frozen layer.
    assert "first" not in str(jax.tree_util.tree_flatten_with_path(state["opt_state"])[0])


@pytest.mark.slow
def test_the_mit_learns_through_frozen_experts_which_get_no_gradient():
    config = tiny_config()
    config.train.prefix_probability = 0.0
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    graphdef, params, _ = sharding.init_sharded(lambda r: build_model(config.model, r), 0, mesh, rules)
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    context = StepContext(jnp.int32(0), jax.random.key(0), {}, None)

    def grads(frozen_experts):
        objective = tokenizer_objective(graphdef, config, num_tokens=8, frozen_experts=frozen_experts)
        with jax.set_mesh(mesh), axis_rules(rules):
            return jax.jit(jax.grad(lambda p: objective.loss(p, {"image": images}, context)[0]))(params)

    free, frozen = flat(jax.device_get(grads(0))), flat(jax.device_get(grads(4)))
    mit = [k for k in free if k.startswith("mit/")]
    for key in mit:
        np.testing.assert_allclose(frozen[key], free[key], rtol=2e-4, atol=1e-7, err_msg=key)
    assert all(np.any(frozen[key] != 0) for key in mit if "kernel" in key)
    for key in (k for k in free if k.startswith("experts/")):
        assert not np.any(frozen[key][:4]), key  # the frozen experts' own gradient
        np.testing.assert_allclose(frozen[key][4:], free[key][4:], rtol=2e-4, atol=1e-7, err_msg=key)


def test_weight_decay_goes_to_matrices_by_rank_and_not_to_embeddings_positions_or_queries():
    config = tiny_config()
    params, axes = abstract_params(config)
    decayed = flat(weight_decay_mask(params, axes))
    for key in ("experts/stack/blocks/layers/mlp/fc1/kernel", "experts/stack/blocks/layers/attention/query",
                "mit/blocks/layers/attention/out", "decoder/head/kernel", "token_head/projection/kernel"):
        assert decayed[key], key
    for key in ("experts/stack/query", "experts/stack/slot_position", "decoder/token_position",
                "mit/embedding/position", "quantizer/codebook", "mit/blocks/layers/attention/query_bias",
                "mit/blocks/layers/mlp_norm/scale", "experts/stack/input_norm/scale"):
        assert not decayed[key], key

    g = generator_config().generator
    g.update(width=32, depth=2, num_heads=2)
    gpt = nnx.eval_shape(lambda: build_generator(g, vocab_size=64, num_tokens=8, num_classes=3, rngs=nnx.Rngs(0),
                                                 dtype="float32"))
    decayed = flat(weight_decay_mask(sharding.params_of(gpt), sharding.param_axes(gpt)))
    for key in ("layers/mlp/gate", "layers/mlp/up", "layers/mlp/down", "head", "layers/attention/query"):
        assert decayed[key], key  # LlamaGen decays its SwiGLU and its output head
    for key in ("token_embedding", "class_embedding", "layers/attention_norm/scale", "final_norm/scale"):
        assert not decayed[key], key


def test_the_tokenizer_step_lowers_with_activation_sharding_constraints():
    config = tiny_config()
    config.mesh.update(data=2, fsdp=2, model=2)
    config.train.batch_size = 8
    mesh = sharding.make_mesh(config.mesh)
    built = build_state(lambda r: build_model(config.model, r), train=config.train, mesh=mesh,
                        rules=sharding.rules_of(config))
    step = tokenizer_train_step(built, config, 8)
    batch = {"image": jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.uint8), "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
    text = step.lower(built.abstract(), batch).as_text()
    constraints = text.count("sdy.sharding_constraint") + text.count("@Sharding")
    assert constraints >= 10, constraints  # every transformer block constrains its activations
    assert '"model"' in text or "model" in text


@pytest.mark.slow
def test_quantizer_warmup_has_no_quantizer_loss_and_the_fitted_codebook_gets_fresh_moments():
    config = tiny_config()
    config.train.update(batch_size=8, num_steps=10, warmup_steps=0, learning_rate=1e-2)
    mesh = sharding.make_mesh(config.mesh)
    built = build_state(lambda r: build_model(config.model, r), train=config.train, mesh=mesh,
                        rules=sharding.rules_of(config))
    step = tokenizer_train_step(built, config, 8, quantizer_warmup_steps=2)
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    batch = {"image": images, "label": np.zeros(8, np.int32)}
    state = built.state
    for _ in range(2):
        state, metrics = step(state, batch)
        assert float(metrics["quantizer_loss"]) == 0.0 and float(metrics["commitment_loss"]) > 0
    adam = lambda s: s["opt_state"][1][0]  # (clip, adamw) -> adamw's scale_by_adam state
    state = jax.tree.map(lambda x: x, state)
    moments = adam(state).mu
    moments["quantizer"]["codebook"] = jnp.ones_like(moments["quantizer"]["codebook"])  # as if it had learned
    codebook = np.asarray(state["params"]["quantizer"]["codebook"])
    other = np.asarray(moments["decoder"]["head"]["kernel"])
    fit = CodebookFit(built, config, sharding.batch_sharding(mesh, (8, 16, 16, 3)))
    state = fit(state, iter([batch] * fit.count))
    assert not np.array_equal(np.asarray(state["params"]["quantizer"]["codebook"]), codebook)
    assert not np.any(np.asarray(adam(state).mu["quantizer"]["codebook"]))
    np.testing.assert_array_equal(np.asarray(adam(state).mu["decoder"]["head"]["kernel"]), other)
    state, metrics = step(state, batch)
    assert float(metrics["quantizer_loss"]) > 0


@pytest.mark.slow
def test_the_discriminator_does_not_run_before_the_adversarial_start():
    config = tiny_config()
    config.train.update(batch_size=8, warmup_steps=0, ema_decay=0.0)
    config.train.losses.update(adversarial_weight=0.5, adversarial_start_step=1)
    config.discriminator.update(width=8, depth=2)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    built = build_state(lambda r: build_model(config.model, r), train=config.train, mesh=mesh, rules=rules)
    discriminator, part, part_shardings = build_discriminator(config, 10, mesh, rules)
    built.add_part("discriminator", part, part_shardings)
    step = tokenizer_train_step(built, config, 8, discriminator=discriminator)
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    batch = {"image": images, "label": np.zeros(8, np.int32)}
    before = jax.tree.map(np.asarray, built.state["discriminator"])
    state, metrics = step(built.state, batch)
    for name in ("discriminator_loss", "discriminator_grad_norm", "adversarial_loss", "adversarial_weight"):
        assert float(metrics[name]) == 0.0, name  # not computed, not merely discarded
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, state["discriminator"]))):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, batch)
    assert float(metrics["discriminator_loss"]) > 0 and float(metrics["adversarial_weight"]) > 0


def test_the_demo_runs_with_40_steps_and_a_bad_warmup_names_the_flag():
    config = load_config_file(os.path.join(CONFIGS, "demo.py"))
    config.train.num_steps = 40
    validate_training(config)
    (stage,) = hnt.stage_list(config)
    assert stage.quantizer_warmup_steps == 10 == quantizer_warmup_steps(config.train)
    config.train.update(quantizer_warmup_fraction=0.0, quantizer_warmup_steps=1150)
    with pytest.raises(ConfigError, match=r"quantizer_warmup_steps: 1150 leaves none of the 40 steps quantised; "
                                          r"lower it, or give the warm-up as --config.train.quantizer_warmup_fraction"):
        validate_training(config)
    config.train.quantizer_warmup_fraction = 0.5
    with pytest.raises(ConfigError, match="are both set"):
        validate_training(config)


def test_the_generator_config_holds_no_tokenizer_schema(tmp_path):
    config = generator_config()
    assert not {"model", "hnt", "pretrained", "discriminator"} & set(config.keys())
    assert not {"losses", "quantizer_warmup_steps", "prefix_probability"} & set(config.train.keys())
    assert {"data", "mesh", "sharding", "generator", "train"} <= set(config.keys())
    checkpoints.write_config(str(tmp_path), config)
    stored = checkpoints.read_config(str(tmp_path))
    assert stored.to_json_best_effort(sort_keys=True) == config.to_json_best_effort(sort_keys=True)


def test_every_entry_point_ends_a_preempted_run_with_one_line():
    with pytest.raises(SystemExit) as stop:
        with ends_preempted_runs():
            raise Preempted("preempted at step 3; checkpoint saved in /x")
    assert stop.value.code == "stopped: preempted at step 3; checkpoint saved in /x; run the same command to resume"
    with pytest.raises(SystemExit) as stop:
        with ends_preempted_runs():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert stop.value.code.startswith("stopped: SIGTERM") and stop.value.code.endswith("run the same command to resume")
    for module in ("main", "sample", "evaluate", "experiments/token_order"):
        with open(os.path.join(ROOT, "nativetok_jax", f"{module}.py")) as f:
            assert "with boundary():" in f.read(), module  # command.boundary: ends_preempted_runs and one-line errors


@pytest.mark.slow
def test_sigterm_saves_within_a_few_steps_although_logs_are_rare(tmp_path):
    config_file = write_config_file(str(tmp_path), log_every=1000, checkpoint_every=1000, eval_every=1000)
    workdir = tmp_path / "run"
    process = start_main(config_file, str(workdir), "--config.train.num_steps=1000")
    deadline = time.time() + 240
    while time.time() < deadline and not (workdir.is_dir() and any(p.name.startswith("events.out") for p in workdir.iterdir())):
        time.sleep(0.1)
    time.sleep(1.0)  # the loop is running (or compiling its first step)
    process.send_signal(signal.SIGTERM)
    code, stderr = finish(process, timeout=600)  # the first step may still be compiling on a busy machine
    assert code == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: preempted at step ") and last.endswith("run the same command to resume"), last
    saved = checkpoints.Checkpoints(str(workdir / "checkpoints"), 5).latest_step()
    assert saved is not None and saved < 1000 and saved == int(last.split("step ")[1].split(";")[0])


def checkpoint_layout(config) -> dict:
    """Names, shapes and logical axes of the train state (abstract: nothing is initialised)."""
    params, axes = abstract_params(config)
    optimizer = make_optimizer(config.train, config.train.num_steps, params, None, axes)
    opt_state = jax.eval_shape(optimizer.init, params)
    shape = lambda x: "x".join(map(str, x.shape)) or "scalar"
    return {"params": {key: f"{shape(value)} ({', '.join(str(a) for a in flat(axes)[key])})"
                       for key, value in sorted(flat(params).items())},
            "ema": "like params" if config.train.ema_decay > 0 else "none",
            "opt_state": {jax.tree_util.keystr(path): shape(leaf)
                          for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]}}


def test_the_demo_checkpoint_layout_is_the_golden_one():
    """A deliberate act to change: rerun with NATIVETOK_UPDATE_GOLDEN=1 and commit the JSON."""
    layout = checkpoint_layout(load_config_file(os.path.join(CONFIGS, "demo.py")))
    if os.environ.get("NATIVETOK_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(layout, f, indent=1, sort_keys=True)
    with open(GOLDEN) as f:
        assert layout == json.load(f)


def test_a_new_trainer_supplies_only_a_model_a_loss_and_data(tmp_path):
    """The module docstring's example: the shared loop checkpoints, evaluates, writes grids and
    traces a profiler window, resumes, for a model it has never seen."""
    import grain

    from nativetok_jax.training import loop

    train = ml_collections.ConfigDict(dict(seed=0, num_steps=6, learning_rate=0.05, final_learning_rate_ratio=1.0,
                                           warmup_steps=0, beta1=0.9, beta2=0.99, weight_decay=0.0,
                                           grad_clip_norm=1.0, ema_decay=0.5, log_every=2, eval_every=3,
                                           checkpoint_every=3, keep_checkpoints=5, profile_steps=1,
                                           profile_first_step=2))
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))
    rng = np.random.default_rng(0)
    examples = [{"x": rng.normal(size=3).astype(np.float32), "y": np.ones(2, np.float32)} for _ in range(64)]

    def task():
        built = build_state(Toy, train=train, mesh=mesh, rules=())

        def loss(params, batch, context):
            error = jnp.mean((nnx.merge(built.graphdef, params)(batch["x"]) - batch["y"]) ** 2)
            return error, ({"mse": error}, None)

        def evaluate(state, step, outputs):
            outputs.grid("inputs", step, [np.zeros((2, 4, 4, 3), np.uint8)])
            return {"evaluated_at": step}

        batches = iter(grain.MapDataset.source(examples).seed(0).shuffle().repeat().batch(8).to_iter_dataset())
        return loop.Task(built, Objective(loss), batches, batch_shardings(mesh, {"x": (8, 3), "y": (8, 2)}),
                         evaluate=evaluate)

    workdir = tmp_path / "toy"
    result = loop.run(task(), train, workdir)
    assert result.step == 6 and result.metrics == {"evaluated_at": 6}
    assert checkpoints.Checkpoints(str(workdir / "checkpoints"), 5).latest_step() == 6
    assert sorted(p.name for p in (workdir / "images").iterdir()) == ["inputs_0000003.png", "inputs_0000006.png"]
    assert any((workdir / "plugins" / "profile").iterdir())
    train.num_steps = 8
    resumed = loop.run(task(), train, workdir)
    assert resumed.step == 8 and int(resumed.state["step"]) == 8


def test_the_codebook_fit_runs_the_encoder_under_the_mesh_and_its_rules(monkeypatch):
    from nativetok_jax.layers.partitioning import active_rules
    from nativetok_jax.training.codebook import encoder_outputs
    from nativetok_jax.training import trainer

    seen = []

    def spy(*args):  # traced inside the encoding's jit
        seen.append((dict(jax.sharding.get_abstract_mesh().shape), active_rules()))
        return encoder_outputs(*args)

    monkeypatch.setattr(trainer, "encoder_outputs", spy)
    config = tiny_config()
    config.mesh.update(data=2, fsdp=2, model=2)
    config.train.update(batch_size=8, num_steps=4, warmup_steps=0)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_of(config)
    built = build_state(lambda r: build_model(config.model, r), train=config.train, mesh=mesh, rules=rules)
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    fit = CodebookFit(built, config, sharding.batch_sharding(mesh, (8, 16, 16, 3)))
    fit(built.state, iter([{"image": images}] * fit.count))
    assert seen == [({"data": 2, "fsdp": 2, "model": 2}, tuple(rules))]


def test_constraints_under_a_mesh_without_rules_are_an_error():
    from nativetok_jax.layers.partitioning import MissingRulesError, constrain

    x = jnp.ones((8, 4))
    assert constrain(x, ("batch", "embed")) is x  # no mesh: one device, nothing to constrain
    mesh = sharding.make_mesh(tiny_config().mesh)
    with jax.set_mesh(mesh), pytest.raises(MissingRulesError, match="no logical-axis rules are active"):
        jax.jit(lambda a: constrain(a, ("batch", "embed")))(x)


def _toy_run(train, mesh, evaluated):
    import grain

    from nativetok_jax.training import loop

    built = build_state(Toy, train=train, mesh=mesh, rules=())

    def loss(params, batch, context):
        error = jnp.mean((nnx.merge(built.graphdef, params)(batch["x"]) - batch["y"]) ** 2)
        return error, ({"mse": error}, None)

    def evaluate(state, step, outputs):
        evaluated.append(step)
        return {"evaluated_at": step}

    rng = np.random.default_rng(0)
    examples = [{"x": rng.normal(size=3).astype(np.float32), "y": np.ones(2, np.float32)} for _ in range(64)]
    batches = iter(grain.MapDataset.source(examples).seed(0).shuffle().repeat().batch(8).to_iter_dataset())
    return loop.Task(built, Objective(loss), batches, batch_shardings(mesh, {"x": (8, 3), "y": (8, 2)}),
                     evaluate=evaluate)


def _toy_train(**changes):
    train = dict(seed=0, num_steps=6, learning_rate=0.05, final_learning_rate_ratio=1.0, warmup_steps=0, beta1=0.9,
                 beta2=0.99, weight_decay=0.0, grad_clip_norm=1.0, ema_decay=0.5, log_every=2, eval_every=3,
                 checkpoint_every=3, keep_checkpoints=5)
    return ml_collections.ConfigDict(dict(train, **changes))


def test_a_run_preempted_at_an_evaluation_step_makes_the_evaluation_up_when_it_resumes(tmp_path, monkeypatch):
    """The stop saves without evaluating (to save in time); the resumed run evaluates that step
    first, so the two processes together evaluate the steps an uninterrupted run does."""
    from nativetok_jax.training import loop

    class StopAt3:
        reason = "preempted"

        def reached(self, step):
            return step == 3

        def restore(self):
            pass

    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))
    uninterrupted = []
    loop.run(_toy_run(_toy_train(), mesh, uninterrupted), _toy_train(), tmp_path / "whole")
    first, second = [], []
    with monkeypatch.context() as patch:
        patch.setattr(loop, "Preemption", StopAt3)
        with pytest.raises(Preempted, match="at step 3"):
            loop.run(_toy_run(_toy_train(), mesh, first), _toy_train(), tmp_path / "split")
    loop.run(_toy_run(_toy_train(), mesh, second), _toy_train(), tmp_path / "split")
    assert uninterrupted == [3, 6] and first + second == [3, 6]


def test_a_profile_window_from_step_0_traces(tmp_path):
    """train.profile_first_step = 0 traces from the first step (compilation included), as the
    window's docstring says; the loop used to tell the window only of finished steps, from 1."""
    from nativetok_jax.training import loop

    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1)))
    train = _toy_train(num_steps=2, eval_every=2, checkpoint_every=2, profile_steps=1, profile_first_step=0)
    loop.run(_toy_run(train, mesh, []), train, tmp_path / "run")
    assert any((tmp_path / "run" / "plugins" / "profile").iterdir())
