"""The command lines: the main job's one-line errors and the model benchmark's JSON (training runs of
the main job are in test_training.py)."""

import json
import os
import subprocess
import sys

from nativetok_jax.bench import model as model_bench

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TESTS = os.path.dirname(os.path.abspath(__file__))


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nativetok_jax.main", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_main_reports_a_bad_config_field_in_one_line(tmp_path):
    result = run_main("--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.model.encoder.num_heads=3")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: config.model.encoder.width: 128 is not divisible by num_heads=3"
    assert "Traceback" not in result.stderr


def test_model_benchmark_writes_json_with_measurements(tmp_path, capsys):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(
        f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom conftest import tiny_config\n\n"
        "def get_config():\n    return tiny_config()\n"
    )
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
