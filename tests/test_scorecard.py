"""``python -m benchmarks.scorecard``: each part of a row's target with the value it was judged on."""

import json

import pytest
import torch

from benchmarks import harness, scorecard
from benchmarks.harness import Environment, Measurement, Target
from benchmarks.suite import Suite


def _row(**changes) -> harness.Row:
    fields = dict(op="x", shape="s", dtype="bfloat16", provider="triton", baseline="ref", median_ms=2.0,
                  peak_mib=100.0, speedup_vs_baseline=0.5, memory_ratio_vs_baseline=2.0, target=None,
                  target_pass=None, device="d", torch="t", triton=None, cuda=None, git_sha="g", date="now",
                  metrics={"learned": False, "frac_of_matmul_peak": 0.135, "note": "not measured"})
    fields.update(changes)
    return harness.Row(**fields)


def test_a_part_records_the_value_its_text_names():
    row = _row()
    # "time<=1.15x base" is a speedup of at least 1/1.15: the part records the time ratio, 1/0.5.
    assert Target("speedup", 1 / 1.15, "time<=1.15x base", invert=True).part(row) == {
        "text": "time<=1.15x base", "value": 2.0, "met": False}
    assert Target("speedup", 0.4, "speedup>=0.4").part(row) == {"text": "speedup>=0.4", "value": 0.5, "met": True}
    assert Target("memory_ratio", 1 / 0.6, "mem<=0.6x", invert=True).part(row) == {
        "text": "mem<=0.6x", "value": 0.5, "met": True}
    assert Target("peak_mib_max", 64, "peak<=64").part(row) == {"text": "peak<=64", "value": 100.0, "met": False}
    # A bool stays a bool, inverted or not; a note or a missing metric is not judged.
    assert Target("metric_min:learned", 1, "learned", invert=True).part(row) == {
        "text": "learned", "value": False, "met": False}
    assert Target("metric_max:note", 1, "n").part(row) == {"text": "n", "value": None, "met": None}
    assert Target("metric_min:tflops", 1, "t", invert=True).part(row) == {"text": "t", "value": None, "met": None}
    assert Target("speedup", 2, "s", invert=True).part(_row(speedup_vs_baseline=0.0))["value"] == float("inf")
    with pytest.raises(ValueError, match="unknown target metric 'speed'"):
        Target("speed", 1, "").part(row)


def test_a_part_value_written_as_text_is_shown_as_it_is():
    """Result files write a non-finite value as text ("inf", "nan"): shown as it is, not as a percentage."""
    assert scorecard._value({"text": ">=50% matmul peak", "value": "inf"}) == "inf"
    assert scorecard._value({"text": "speedup>=2", "value": "nan"}) == "nan"
    assert scorecard._value({"text": ">=50% matmul peak", "value": 0.4567}) == "45.7%"


def test_each_family_is_headed_by_its_issue_on_a_gpu_only():
    """On a GPU a family's targets are one issue's (lora 3, hypergraph 4, the contrastive families 5,
    model 6, training 7); on a CPU they are headed as CPU targets; a family of no issue by its name."""
    families = ("lora", "hypergraph", "contrastive", "contrastive_probe", "distributed", "model", "training")
    assert [scorecard._title(family, True).split(",")[0] for family in families] == [
        "lora: issue 3", "hypergraph: issue 4", "contrastive: issue 5", "contrastive_probe: issue 5",
        "distributed: issue 5", "model: issue 6", "training: issue 7"]
    assert scorecard._title("training", False) == "training (CPU targets)"
    assert scorecard._title("tuning", True) == "tuning" and scorecard._title("", True) == "rows without a family"


def _gpu_payload(tmp_path):
    """A result file of a (fake) GPU run written by the suite's own row and save code: LoRA's
    frozen-base target missed, the InfoNCE rate missed, a met zero-shot row, a baseline row."""
    from benchmarks import bench_contrastive, bench_lora

    env = Environment(device="NVIDIA H200", device_type="cuda", torch="t", triton="3.6", cuda="13.0",
                      git_sha="abc", date="2026-12-01", python="3", threads=1, load_average=None)

    class FakeGpuSuite(Suite):
        @property
        def is_gpu(self):
            return True

    path = tmp_path / "run.json"
    suite = FakeGpuSuite(device=torch.device("cpu"), quick=False, json_path=str(path), png_path=None,
                         time_budget_s=None, max_seconds_per_call=0.05, providers=["triton"], log=lambda _: None,
                         environment=env)
    suite.calibration["bf16_matmul_tflops"] = 700.0
    base, ours = Measurement(1.0, 50.0, 5), Measurement(1.84, 40.0, 5)
    suite.add_rows(family="lora", op="lora_qkv", shape="M=201728 K=768 out=768 r=4 p=0.1", dtype=torch.bfloat16,
                   ours={"triton": (ours, {"rel_err_vs_frozen-base": 2e-3})},
                   baselines={"frozen-base": (base, {})}, targets=bench_lora._targets(suite))
    goals = bench_contrastive._targets(suite, dict(batch=65536, labeled=True))("triton", None)
    suite.add_plain_row(family="contrastive", op="label_guided_infonce", shape="B=65536 D=512 labels",
                        dtype=torch.bfloat16, provider="triton", measurement=Measurement(185.5, 129.0, 5),
                        metrics={"frac_of_matmul_peak": 0.135, "extra_mib_excl_grads": 1.3,
                                 "rel_err_vs_fp32_chunked": 1e-3},
                        mode="fwd+bwd", targets=goals)
    suite.add_rows(family="model", op="zero_shot_eval", shape="N=256 | C=5x2", dtype=torch.bfloat16,
                   ours={"triton": (Measurement(1.0, 10.0, 5), {"max_abs_score_diff_vs_reference-loop": 1e-3})},
                   baselines={"reference-loop": (Measurement(40.0, 10.0, 5), {})},
                   targets=lambda provider, baseline: [Target("speedup", 20.0, "throughput>=20x")])
    suite.save()
    return path


def test_the_scorecard_of_a_gpu_run_gives_each_part_its_value(tmp_path, capsys):
    path = _gpu_payload(tmp_path)
    rows = harness.load_rows(str(path))
    lora = next(r for r in rows if r["op"] == "lora_qkv" and r["baseline"])
    assert lora["target_parts"] == [
        {"text": "time<=1.15x base", "value": pytest.approx(1.84), "met": False},
        {"text": "rel_err_vs_frozen-base<=0.03", "value": 2e-3, "met": True}]
    # The rows read back from the file keep their parts.
    assert harness.row_from_json(lora).target_parts == lora["target_parts"]

    assert scorecard.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"## NVIDIA H200: {path}\n")
    assert "torch t, triton 3.6, cuda 13.0, git_sha abc, date 2026-12-01." in out
    assert "Measured in the same run: bf16 matmul 700.0 TFLOP/s" in out
    assert "Targets: 1 of 3 met, 2 missed, 0 not judged" in out
    assert "### lora: issue 3, fused LoRA kernels" in out and "### contrastive: issue 5" in out
    assert ("| lora_qkv | M=201728 K=768 out=768 r=4 p=0.1 | triton | frozen-base | 1.84 | 0.543x | 1.25x | "
            "time<=1.15x base: 1.84 (no); rel_err_vs_frozen-base<=0.03: 0.002 (yes) | no |") in out
    # A rate stated in percent is shown in percent; "|" in a shape is escaped for Markdown.
    assert ">=50% matmul peak: 13.5% (no); extra<=64MiB: 1.30 (yes)" in out
    assert "| zero_shot_eval | N=256 \\| C=5x2 | triton | reference-loop |" in out
    assert "frozen-base | - |" not in out  # baseline rows hold no target: not listed

    assert scorecard.main(["--missed", str(path)]) == 0
    missed = capsys.readouterr().out
    assert "lora_qkv" in missed and "label_guided_infonce" in missed and "zero_shot_eval" not in missed
    assert "### model" not in missed and "Targets: 1 of 3 met" in missed  # the counts are the whole run's


def test_rows_written_before_target_parts_give_text_and_verdict(tmp_path, capsys):
    path = _gpu_payload(tmp_path)
    payload = json.loads(path.read_text())
    payload["environment"]["device_type"] = "cpu"
    for row in payload["rows"]:
        row.pop("target_parts")
    path.write_text(json.dumps(payload))
    assert scorecard.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "### lora (CPU targets)" in out  # on a CPU the targets are not the GPU issues'
    assert "| 0.543x | 1.25x | time<=1.15x base & rel_err_vs_frozen-base<=0.03: no | no |" in out


def test_a_file_that_is_not_a_result_file_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    assert scorecard.main([str(bad)]) == 2
    assert f"scorecard: argument RESULTS.json: cannot read {str(bad)!r} as a result file" in capsys.readouterr().err
    assert scorecard.main([str(tmp_path / "missing.json")]) == 2
    assert "FileNotFoundError" in capsys.readouterr().err
    # A bad file among good ones: said, exit status 2, and the good ones still get their sections.
    good = _gpu_payload(tmp_path)
    assert scorecard.main([str(good), str(bad), str(good)]) == 2
    out, err = capsys.readouterr()
    assert out.count(f": {good}\n") == 2 and str(bad) in err and str(bad) not in out


def test_a_run_without_targets_says_so(tmp_path, capsys):
    path = _gpu_payload(tmp_path)
    payload = json.loads(path.read_text())
    payload["rows"] = [r for r in payload["rows"] if not r["target"]]
    payload["run"]["quick"] = True
    path.write_text(json.dumps(payload))
    assert scorecard.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "A --quick run: small shapes, no target judged." in out
    assert "Targets: 0 of 0 met" in out and out.rstrip().endswith("No row of this run is held to a target.")


def test_gpu_check_writes_the_scorecard_into_its_main_log(tmp_path):
    """gpu_check.sh's last python step (the scorecard, then the plot) runs as the script runs it."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "benchmarks", "gpu_check.sh"), encoding="utf-8").read()
    start = text.index('$PY - "$OUT/$STEM.json" "$OUT/$STEM.png" >>"$LOG" 2>&1 <<\'EOF\'\n')
    body = text[text.index("\n", start) + 1:text.index("\nEOF\n", start)]
    path = _gpu_payload(tmp_path)
    proc = subprocess.run([sys.executable, "-", str(path), str(tmp_path / "run.png")], input=body, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert f"## NVIDIA H200: {path}" in proc.stdout and "time<=1.15x base: 1.84 (no)" in proc.stdout, proc.stderr
    assert "plot: " in proc.stdout + proc.stderr


def _edit(path, change):
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))


def test_scorecard_shows_unjudged_parts_bools_missing_ratios_and_the_calibration_warning(tmp_path, capsys):
    path = _gpu_payload(tmp_path)

    def change(payload):
        payload["run"]["calibration"]["warning"] = "the card was busy"
        row = dict(payload["rows"][-1], op="probe_op", target_pass=None, speedup_vs_baseline=None,
                   target_parts=[{"text": "learned", "value": True, "met": True},
                                 {"text": "kept", "value": False, "met": False},
                                 {"text": "tflops", "value": None, "met": None}])
        payload["rows"].append(row)
    _edit(path, change)
    assert scorecard.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "copy - GB/s (the card was busy)." in out
    assert "Targets: 1 of 4 met, 2 missed, 1 not judged" in out
    # a plain row has no baseline ratios: "-"
    assert "| label_guided_infonce | B=65536 D=512 labels | triton | - | 185.5 | - | - |" in out
    assert "| - | 1.00x | learned: yes (yes); kept: no (no); tflops: - (-) | - |" in out
    # --missed lists the rows missed *or not judged*
    assert scorecard.main(["--missed", str(path)]) == 0
    missed = capsys.readouterr().out
    assert "probe_op" in missed and "zero_shot_eval" not in missed


def test_scorecard_without_environment_details_and_rows_without_family(tmp_path, capsys):
    path = _gpu_payload(tmp_path)

    def change(payload):
        env = payload["environment"]
        env["device_type"] = "cpu"
        for key in ("torch", "triton", "cuda", "git_sha", "date"):
            env.pop(key)
        for row in payload["rows"]:
            row.pop("family", None)
    _edit(path, change)
    assert scorecard.main([str(path), str(path)]) == 0
    out = capsys.readouterr().out
    # No environment line, no stray ".", and never two blank lines in a row.
    assert out.startswith(f"## NVIDIA H200: {path}\n\nMeasured in the same run: ") and "\n\n\n" not in out
    assert "### rows without a family" in out and "(CPU targets)" not in out
    # two sections are separated by a blank line
    assert f"\n\n## NVIDIA H200: {path}\n" in out


def test_a_result_file_with_malformed_target_parts_is_refused_not_a_traceback(tmp_path, capsys):
    good = _gpu_payload(tmp_path)
    for name, parts in (("keyerror.json", [{"value": 1.0, "met": True}]),   # no 'text'
                        ("typeerror.json", [{"text": "t", "value": [1], "met": True}])):  # not a number
        bad = tmp_path / name
        bad.write_text(good.read_text())
        _edit(bad, lambda payload: payload["rows"][-1].update(target_parts=parts))
        assert scorecard.main([str(bad), str(good)]) == 2
        out, err = capsys.readouterr()
        assert f"cannot read {str(bad)!r} as a result file" in err and f": {good}\n" in out


def test_the_scorecard_names_what_the_run_did_not_measure(tmp_path, capsys):
    """A target whose row never came (its item skipped for time, its family's process lost) has no
    line in the tables: the section names the run's skip lines under the counts, so that "1 of 3
    met" is not read as all the issue's targets judged."""
    path = _gpu_payload(tmp_path)
    payload = json.loads(path.read_text())
    payload["run"]["skipped"] = [
        "label_guided_infonce B=1000000 D=512 labels: skipped (the run's time budget is spent)",
        "family hypergraph: skipped (lost: its process died of SIGABRT (12 s); rows it saved are kept)"]
    path.write_text(json.dumps(payload))
    for argv in ([str(path)], ["--missed", str(path)]):
        assert scorecard.main(argv) == 0
        out = capsys.readouterr().out
        counts = out.index("Targets: 1 of 3 met")
        listed = out.index("Not measured in this run (2 skip lines of the run")
        assert counts < listed < out.index("### lora")
        assert "- label_guided_infonce B=1000000 D=512 labels: skipped (the run's time budget is spent)" in out
        assert "- family hypergraph: skipped (lost: its process died of SIGABRT" in out
    payload["run"]["skipped"] = []
    path.write_text(json.dumps(payload))
    assert scorecard.main([str(path)]) == 0
    assert "Not measured in this run" not in capsys.readouterr().out
