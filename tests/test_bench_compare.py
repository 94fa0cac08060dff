"""``bench compare`` on a tiny size: it runs, both models have the same parameters, and its JSON is
what it printed (no timing assertions: the machine is shared)."""

import json

from nativetok_jax.bench import compare


def test_compare_runs_tiny_and_writes_what_it_prints(tmp_path, capsys):
    out = tmp_path / "compare.json"
    report = compare.run(["--tiny", "--tokens", "3", "--repeats", "1", "--chunks", "2", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(report["rows"]))
    assert [r["num_tokens"] for r in written["rows"]] == [3] and written["rows"][0]["chunks"] == 2
    row = written["rows"][0]
    assert row["ours_params"] == row["torch_params"]  # the PyTorch prototype mirrors ours exactly
    assert row["ours_step_s"] > 0 and row["torch_step_s"] > 0
    assert compare.format_header() in printed
    assert compare.format_row(row) in printed
