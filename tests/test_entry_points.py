"""The command lines: the main job's one-line errors and the model, training and sampling benchmarks'
JSON (training runs of the main job are in test_training.py)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import write_config_file
from nativetok_jax.bench import generate as generate_bench
from nativetok_jax.bench import model as model_bench
from nativetok_jax.bench import train as train_bench

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nativetok_jax.main", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_main_reports_a_bad_config_field_in_one_line(tmp_path):
    result = run_main("--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.model.encoder.num_heads=3")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: config.model.encoder.width: 128 is not divisible by num_heads=3"
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_model_benchmark_writes_json_with_measurements(tmp_path, capsys):
    config_file = write_config_file(tmp_path, "conftest.tiny_config")
    out = tmp_path / "model.json"
    report = model_bench.run(
        ["--config", str(config_file), "--tokens", "2,4", "--unrolled_tokens", "2", "--steps", "1", "--batch_size", "2",
         "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = {(r["num_tokens"], r["experts"]): r for r in report["rows"]}
    assert set(rows) == {(2, "scanned"), (2, "unrolled"), (4, "scanned")}
    for row in rows.values():
        assert row["compile_s"] > 0 and row["step_s"] > 0 and row["forward_gflops"] > 0
    # Exact FLOP counts grow with the number of experts.
    assert rows[(4, "scanned")]["forward_gflops"] > rows[(2, "scanned")]["forward_gflops"]
    assert rows[(4, "scanned")]["num_params"] > rows[(2, "scanned")]["num_params"]
    assert "compile s" in capsys.readouterr().out


@pytest.mark.slow
def test_train_benchmark_writes_json_with_step_time_flops_memory_and_the_growth_stage(tmp_path, capsys):
    config_file = write_config_file(tmp_path, "conftest.tiny_config")
    out = tmp_path / "train.json"
    report = train_bench.run(["--configs", config_file, "--batch_sizes", "8", "--steps", "1",
                              "--growth_config", config_file, "--growth_tokens", "4,8", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["num_devices"] == 8 and report["matmul_gflops_per_s"] > 0
    (row,) = report["rows"]
    assert row["batch_size"] == 8 and row["step_s"] > 0 and row["compile_s"] > 0
    assert row["images_per_s"] == 8 / row["step_s"]
    assert row["step_gflops"] > 0 and row["peak_memory_mb"] > 0
    assert row["mfu"] == pytest.approx(row["step_gflops"] / row["step_s"] / report["matmul_gflops_per_s"])
    growth = report["growth"]
    assert (growth["old_tokens"], growth["new_tokens"]) == (4, 8)
    assert growth["frozen"] == ["mit", "old_experts", "token_head", "quantizer"]
    assert growth["speedup"] == pytest.approx(growth["all_experts_step_s"] / growth["growth_stage_step_s"])
    assert growth["all_experts_step_s"] == row["step_s"]  # the same step as the row (8 tokens, batch 8): reused
    assert "GFLOP/step" in capsys.readouterr().out


def test_generate_benchmark_times_both_samplers_and_they_draw_the_same_tokens(tmp_path, capsys):
    out = tmp_path / "generate.json"
    report = generate_bench.run(["--width", "32", "--depth", "2", "--num_heads", "2", "--vocab_size", "64",
                                 "--num_classes", "3", "--batch_size", "2", "--num_tokens", "6", "--repeats", "1",
                                 "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [row["sampler"] for row in report["rows"]] == ["cached", "uncached"]
    assert report["same_tokens"] is True and report["guidance"] is True
    for row in report["rows"]:
        assert row["compile_s"] > 0 and row["ms_per_token"] == pytest.approx(row["sample_s"] * 1e3 / 6)
    assert report["speedup"] == pytest.approx(report["rows"][1]["sample_s"] / report["rows"][0]["sample_s"])
    assert "same tokens: True" in capsys.readouterr().out
