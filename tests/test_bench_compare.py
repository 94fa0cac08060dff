"""``bench compare`` and ``bench profile`` on a tiny size: they run, both models of the comparison have
the same parameters, the profile attributes operations to phases, kinds and sources, and each JSON is
what was printed (no timing assertions: the machine is shared)."""

import json
import os
import shutil

import pytest

from nativetok_jax.bench import compare, peer, profile

# A stand-in laid out like a checkout of wangbei1/order_1-d (modeling/blocks_new.py, modeling/quantizer.py),
# with the authors' interface and parameter shapes, so that --prototype is tested without their code.
STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "order_1d_standin")


def standin_checkout(tmp_path) -> str:
    directory = tmp_path / "order_1-d"
    shutil.copytree(STANDIN, directory)
    return str(directory)


@pytest.mark.slow
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


@pytest.mark.slow
def test_compare_against_a_prototype_checkout_counts_both_sides_by_part_and_names_differences(tmp_path, capsys):
    out = tmp_path / "compare.json"
    checkout = standin_checkout(tmp_path)
    report = compare.run(["--prototype", checkout, "--tiny", "--tokens", "3", "--repeats", "1", "--chunks", "2",
                          "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report))
    assert (written["opponent"], written["prototype_dir"]) == ("prototype", checkout)
    assert len(written["matmul_gflops_per_s"]) == 2 and min(written["matmul_gflops_per_s"]) > 0
    (row,) = written["rows"]
    assert row["ours_step_s"] > 0 and row["torch_step_s"] > 0 and row["speedup"] > 0
    sizes, num_tokens = compare.TINY_PROTOTYPE, 3
    (mit_width, _, _), (width, _, _), patch = sizes["encoder"], sizes["experts"], sizes["patch_size"]
    parts = row["params_by_part"]
    assert set(parts) == {"mit", "experts", "token_head", "quantizer", "decoder"}
    diff = {part: c["ours"] - c["theirs"] for part, c in parts.items()}
    # Equal but for what the report names: our MIT's final LayerNorm; per expert our own LayerNorm,
    # query and slot position against their latent token, and their one shared LayerNorm; our
    # decoder's hidden token and pixel output layer against their 1024 code logits.
    assert diff["token_head"] == diff["quantizer"] == 0
    assert diff["mit"] == 2 * mit_width
    assert diff["experts"] == num_tokens * 3 * width - 2 * width
    assert row["head_difference"] == (2 * width + 1) * (3 * patch**2 - 1024)
    assert diff["decoder"] == row["head_difference"] + width
    assert row["ours_params"] - row["torch_params"] == sum(diff.values())
    assert sorted(d.split(" parameters")[0] for d in row["differences"][:3]) == ["decoder", "experts", "mit"]
    assert any(d.startswith("loss:") for d in row["differences"])
    printed = capsys.readouterr().out
    assert "the authors' prototype" in printed and compare.format_row(row) in printed.splitlines()
    assert all(f"differs (L = 3): {d}" in printed for d in row["differences"])


def test_compare_prototype_errors_are_one_line_and_come_before_compiling(tmp_path):
    checkout = standin_checkout(tmp_path)
    out = str(tmp_path / "compare.json")

    def error(*argv) -> str:
        with pytest.raises(SystemExit) as raised:
            compare.run(["--tiny", "--tokens", "3", "--out", out, *argv])
        message = str(raised.value)
        assert "\n" not in message
        return message

    assert "no such directory" in error("--prototype", str(tmp_path / "missing"))
    os.remove(os.path.join(checkout, "modeling", "quantizer.py"))
    assert "no modeling/quantizer.py there" in error("--prototype", checkout)
    blocks = os.path.join(checkout, "modeling", "blocks_new.py")
    os.remove(blocks)
    assert "no modeling/blocks_new.py there" in error("--prototype", checkout)
    shutil.copytree(os.path.join(STANDIN, "modeling"), os.path.join(checkout, "modeling"), dirs_exist_ok=True)
    with open(blocks, "a") as f:
        f.write("\ndel TiTokDecoder\n")
    assert "blocks_new.py defines no TiTokDecoder" in error("--prototype", checkout)
    shutil.copy(os.path.join(STANDIN, "modeling", "blocks_new.py"), blocks)
    assert "(depth, heads)" in error("--prototype", checkout, "--set", "model.decoder.depth=3")
    assert "heads" in error("--prototype", checkout, "--set", "model.experts.num_heads=2")
    assert not os.path.exists(out)


def test_the_standin_checkout_has_the_authors_parameter_count():
    """19,430,540 (the harness's count of their encoder, decoder and latent tokens at L = 32) plus their
    4096 x 12 quantiser's codebook."""
    modules = peer.load(STANDIN)
    config = compare.compare_config(compare.PROTOTYPE, 32, "float32", None, 256)
    assert sum(p.numel() for p in peer.build(modules, config.model).parameters()) == 19_430_540 + 4096 * 12


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
    assert report["groups"] == [dict(phase="forward", kind="matmul", ms=8.0, share=0.8, ops=1.0),
                                dict(phase="backward", kind="elementwise/reduce", ms=1.0, share=0.1, ops=0.5),
                                dict(phase="unattributed", kind="copy/transpose", ms=1.0, share=0.1, ops=0.5)]
    assert report["ops_per_step"] == 2.0  # operations run per step, whatever they took
    assert report["top_sources"][0] == dict(source="jvp()/while/body/dot_general", kind="matmul", ms=8.0, share=0.8,
                                            ops=1.0)
    assert report["top_sources"][-1]["source"] == "(inserted by XLA)"


@pytest.mark.slow
def test_profile_runs_tiny_and_writes_what_it_prints(tmp_path, capsys):
    out = tmp_path / "profile.json"
    report = profile.run(["--tiny", "--tokens", "3", "--chunks", "2", "--steps", "1", "--set", "model.experts.remat=True",
                          "--count_flops", "--trace_dir", str(tmp_path / "trace"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert (report["num_tokens"], report["chunks"], report["overrides"]) == (3, 2, ["model.experts.remat=True"])
    assert sum(g["share"] for g in report["groups"]) == pytest.approx(1.0)
    by_group = {(g["phase"], g["kind"]): g["ms"] for g in report["groups"]}
    assert by_group[("forward", "matmul")] > 0 and by_group[("backward", "matmul")] > 0
    assert report["step_s"] > 0 and report["step_gflops"] > 0
    assert report["unrolled_step_gflops"] > report["step_gflops"]  # the scanned count has each loop body once
    assert report["ops_per_step"] > sum(g["ops"] for g in report["groups"] if g["kind"] == "matmul") > 0
    printed = capsys.readouterr().out
    assert all(line in printed for line in profile.format_report(report))
    with pytest.raises(SystemExit, match="no such field"):
        profile.run(["--tiny", "--tokens", "3", "--set", "model.experts.remmat=True", "--out", str(out)])
