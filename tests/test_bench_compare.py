"""``bench compare`` and ``bench profile`` on a tiny size: they run, both models of the comparison have
the same parameters, the profile attributes operations to phases, kinds and sources, and each JSON is
what was printed (no timing assertions: the machine is shared)."""

import json

import pytest

from nativetok_jax.bench import compare, profile


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


HLO = """HloModule jit_step

%fused_computation.1 (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.3 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (p0: f32[4,2]) -> f32[4] {
  %p0 = f32[4,2]{1,0} parameter(0)
  ROOT %reduce.1 = f32[4]{0} reduce(%p0), dimensions={1}
}

ENTRY %main.9 (a: f32[4,8], b: f32[8,2]) -> (f32[4], f32[2,4]) {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %ynn_fusion.7 = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(step)/jvp()/while/body/closed_call/dot_general"}
  %ynn_fusion.8 = f32[4]{0} fusion(%ynn_fusion.7), kind=kCustom, calls=%fused_computation.2, metadata={op_name="jit(step)/transpose(jvp())/reduce_sum"}
  %copy.4 = f32[2,4]{0,1} copy(%ynn_fusion.7)
  %bitcast_dynamic-update-slice_fusion.2 = f32[4]{0} fusion(%ynn_fusion.8), kind=kLoop, calls=%fused_computation.2, metadata={op_name="jit(step)/jvp()/while/body/jit(dynamic_update_index_in_dim)/dynamic_update_slice"}
  %while.5 = (f32[4], s32[]) while(%tuple.1), condition=%cond, body=%body
  ROOT %tuple.9 = (f32[4]{0}, f32[2,4]{0,1}) tuple(%ynn_fusion.8, %copy.4)
}
"""


def test_profile_reads_kinds_phases_and_sources_from_the_compiled_module():
    instructions = profile.hlo_instructions(HLO)
    assert instructions["ynn_fusion.7"] == profile.Instruction(
        "fusion", "jit(step)/jvp()/while/body/closed_call/dot_general", "matmul")  # its computation holds a dot
    assert instructions["ynn_fusion.8"].kind == "elementwise/reduce"  # a YNNPACK reduction is no matmul
    assert instructions["copy.4"] == profile.Instruction("copy", None, "copy/transpose")
    assert instructions["bitcast_dynamic-update-slice_fusion.2"].kind == "dynamic slice/update"
    assert instructions["while.5"].opcode == "while" and instructions["tuple.9"].opcode == "tuple"
    events = [("ynn_fusion.7", 6.0), ("ynn_fusion.8", 2.0), ("copy.4", 2.0), ("while.5", 100.0),
              ("ThunkExecutor::Execute", 50.0), ("ynn_fusion.7", 10.0)]
    report = profile.attribute(events, instructions, num_steps=2)  # the loop's and the executor's time are not counted
    assert report["op_ms_per_step"] == 10.0
    assert report["groups"] == [dict(phase="forward", kind="matmul", ms=8.0, share=0.8),
                                dict(phase="backward", kind="elementwise/reduce", ms=1.0, share=0.1),
                                dict(phase="unattributed", kind="copy/transpose", ms=1.0, share=0.1)]
    assert report["top_sources"][0] == dict(source="jvp()/while/body/dot_general", kind="matmul", ms=8.0, share=0.8)
    assert report["top_sources"][-1]["source"] == "(inserted by XLA)"


def test_profile_runs_tiny_and_writes_what_it_prints(tmp_path, capsys):
    out = tmp_path / "profile.json"
    report = profile.run(["--tiny", "--tokens", "3", "--chunks", "2", "--steps", "1", "--set", "model.experts.remat=True",
                          "--trace_dir", str(tmp_path / "trace"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert (report["num_tokens"], report["chunks"], report["overrides"]) == (3, 2, ["model.experts.remat=True"])
    assert sum(g["share"] for g in report["groups"]) == pytest.approx(1.0)
    by_group = {(g["phase"], g["kind"]): g["ms"] for g in report["groups"]}
    assert by_group[("forward", "matmul")] > 0 and by_group[("backward", "matmul")] > 0
    assert report["step_s"] > 0 and report["step_gflops"] > 0
    printed = capsys.readouterr().out
    assert all(line in printed for line in profile.format_report(report))
    with pytest.raises(SystemExit, match="no such field"):
        profile.run(["--tiny", "--tokens", "3", "--set", "model.experts.remmat=True", "--out", str(out)])
