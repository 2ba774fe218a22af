"""Launch configurations measured per card: ``ace_kernels._tuning``, the sweep family of the
benchmark suite (``benchmarks/bench_tuning.py``) and the tool that writes its choices
(``python -m benchmarks.tuned_configs``).

No GPU is needed: the card's name is faked where a lookup needs one, and the sweep runs on
the CPU interpreter through a suite that takes itself for a GPU one (its times mean nothing;
the rows, the probes and the forcing are what is checked). Whether each candidate computes
the right thing, and compiles for sm_90a without spills, is checked in tests/test_lora.py and
tests/test_contrastive.py (``test_triton_sweep_candidates_*``, ``*_compile_for_sm90_*``).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from ace_kernels import _dispatch, _tuning
from ace_kernels import contrastive as contrastive_ops
from ace_kernels import lora as lora_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench_tuning, tuned_configs  # noqa: E402

CARD = "NVIDIA H200"
CUDA0 = torch.device("cuda", 0)
DOWN = lora_ops._GPU_CANDIDATES[("down", "16bit")]
DEFAULT_DOWN = lora_ops._GPU_CONFIGS["down"]["16bit"]


@pytest.fixture
def on_card(monkeypatch):
    """Tuned LoRA entries for CARD (set them in the returned dict, the InfoNCE ones in its
    ``contrastive`` attribute); device cuda:0 is CARD, cuda:1 another card."""

    class Entries(dict):
        contrastive: dict

    tuned = Entries()
    tuned.contrastive = {}
    monkeypatch.setattr(_tuning, "_TUNED", {CARD: {"lora": tuned, "contrastive": tuned.contrastive}})
    monkeypatch.setattr(_tuning, "_WARNED", set())
    monkeypatch.setattr(_dispatch, "_cuda_device_name", lambda index: {0: CARD, 1: "Other card"}[index])
    return tuned


def test_a_tuned_candidate_is_launched_on_its_card_only(on_card):
    on_card["down/16bit"] = dict(DOWN[1])
    assert lora_ops._config("down", torch.bfloat16, CUDA0) == DOWN[1]
    assert lora_ops._config("down", torch.float16, CUDA0) == DOWN[1]  # one 16-bit class
    assert lora_ops._config("down", torch.float32, CUDA0) == lora_ops._GPU_CONFIGS["down"]["fp32"]
    assert lora_ops._config("down", torch.bfloat16, torch.device("cuda", 1)) == DEFAULT_DOWN
    assert lora_ops._config("backward", torch.bfloat16, CUDA0) == lora_ops._GPU_CONFIGS["backward"]["16bit"]
    # A forced configuration wins over the file, innermost first, and ends with its block.
    with _tuning.forced("lora", "down", "16bit", DOWN[0]):
        with _tuning.forced("lora", "down", "16bit", DOWN[2]):
            assert lora_ops._config("down", torch.bfloat16, CUDA0) == DOWN[2]
        assert lora_ops._config("down", torch.bfloat16, CUDA0) == DOWN[0]
    assert lora_ops._config("down", torch.bfloat16, CUDA0) == DOWN[1]
    # The caller gets a copy: changing it changes nothing.
    lora_ops._config("down", torch.bfloat16, CUDA0)["BLOCK_M"] = 1
    assert lora_ops._config("down", torch.bfloat16, CUDA0) == DOWN[1]


def test_a_forced_configuration_reaches_other_threads():
    # Autograd runs a CUDA backward on a device thread of its own: the backward kernels the
    # sweep forces must see the configuration forced around backward() on the main thread.
    import threading

    seen = []
    with _tuning.forced("lora", "backward", "16bit", lora_ops._GPU_CANDIDATES[("backward", "16bit")][0]):
        worker = threading.Thread(target=lambda: seen.append(_tuning.forced_config("lora", "backward", "16bit")))
        worker.start()
        worker.join()
    assert seen == [lora_ops._GPU_CANDIDATES[("backward", "16bit")][0]]
    assert _tuning.forced_config("lora", "backward", "16bit") is None


def test_a_forced_configuration_ends_with_its_block_when_the_block_raises():
    # A candidate that fails inside the sweep's block (an error at its launch) must not stay forced
    # for every later launch of the kernel in the process.
    with pytest.raises(RuntimeError, match="^the launch failed$"):
        with _tuning.forced("lora", "down", "16bit", DOWN[0]):
            raise RuntimeError("the launch failed")
    assert _tuning.forced_config("lora", "down", "16bit") is None


def test_a_forced_configuration_is_handed_out_as_a_copy():
    # A launch that completes the configuration it gets (a derived key, say) leaves the forced one as it was.
    with _tuning.forced("lora", "down", "16bit", DOWN[0]):
        _tuning.forced_config("lora", "down", "16bit")["BLOCK_M"] = 1
        assert _tuning.launch_config("lora", "down", "16bit", None, DEFAULT_DOWN) == DOWN[0]


@pytest.mark.triton
def test_forced_configurations_reach_the_backward_kernels(device, monkeypatch):
    """What the sweep forces around a step reaches the kernels of its backward (on a GPU,
    autograd's device thread runs them): every configuration read during the step is recorded."""
    import ace_kernels

    read = []

    def spy(original):
        def wrapped(kernel, *args, **kwargs):
            config = original(kernel, *args, **kwargs)
            read.append((kernel, {k: config[k] for k in ("BLOCK_M", "num_warps", "num_stages") if k in config}))
            return config
        return wrapped

    monkeypatch.setattr(lora_ops, "_config", spy(lora_ops._config))
    monkeypatch.setattr(contrastive_ops, "_launch_config", spy(contrastive_ops._launch_config))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=gen).half().to(device).requires_grad_()
    weight, bias = (torch.randn(3 * 32, 64, generator=gen) / 8).half().to(device), None
    lora_a = (torch.randn(3, 4, 64, generator=gen) / 8).half().to(device).requires_grad_()
    lora_b = torch.randn(3, 32, 4, generator=gen).half().to(device).requires_grad_()
    backward = lora_ops._GPU_CANDIDATES[("backward", "16bit")][1]
    with _tuning.forced("lora", "backward", "16bit", backward):
        outs = ace_kernels.lora_qkv(x, weight, bias, lora_a, lora_b, scaling=0.5, dropout_p=0.1, training=True,
                                    backend="triton")
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    used = [config for kernel, config in read if kernel == "backward"]
    assert used and all(c == {k: backward[k] for k in c} for c in used), read
    read.clear()
    u = torch.nn.functional.normalize(torch.randn(40, 64, generator=gen), dim=1).half().to(device).requires_grad_()
    grad = contrastive_ops._GPU_CANDIDATES[("grad", "16bit/one_dot")][2]
    with _tuning.forced("contrastive", "grad", "16bit/one_dot", grad):
        ace_kernels.label_guided_infonce(u, u.detach().clone(), 10.0, None, backend="triton").backward()
    used = [config for kernel, config in read if kernel == "grad"]
    assert used and all(c == {k: grad[k] for k in c} for c in used), read


def test_an_undeclared_configuration_in_the_file_is_ignored_with_a_warning(on_card):
    unvetted = dict(DEFAULT_DOWN, BLOCK_K=512)
    on_card["down/16bit"] = unvetted
    with pytest.warns(RuntimeWarning, match=r"down/16bit on 'NVIDIA H200' .* not one of the declared candidates"):
        assert lora_ops._config("down", torch.bfloat16, CUDA0) == DEFAULT_DOWN
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per entry, not per launch
        assert lora_ops._config("down", torch.bfloat16, CUDA0) == DEFAULT_DOWN
    # The default is declared too (no candidate of the list): an entry equal to it launches it, unwarned.
    assert DEFAULT_DOWN not in DOWN
    on_card["down/16bit"] = dict(DEFAULT_DOWN)
    _tuning._WARNED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lora_ops._config("down", torch.bfloat16, CUDA0) == DEFAULT_DOWN


def test_a_tuned_entry_of_other_number_types_is_not_launched(on_card):
    """JSON's 64.0 and true equal 64 and 1 but would reach the launch as a float and a bool (a
    tensor size of 32.0 fails): such an entry is refused, and an equal one launches the declared
    configuration itself."""
    lse = contrastive_ops._GPU_CANDIDATES[("lse", "16bit/one_dot")]
    one_stage = next(c for c in lse if c["num_stages"] == 1)
    default_lse = contrastive_ops._GPU_CONFIGS[("lse", "16bit", "one_dot")]
    for odd in (dict(one_stage, num_stages=True), dict(one_stage, BLOCK_M=float(one_stage["BLOCK_M"]))):
        on_card.contrastive["lse/16bit/one_dot"] = odd
        _tuning._WARNED.clear()
        with pytest.warns(RuntimeWarning, match="not one of the declared candidates"):
            config = contrastive_ops._launch_config("lse", torch.bfloat16, 512, interpreter=False, device=CUDA0)
        assert {k: config[k] for k in default_lse} == default_lse
    for odd in (dict(DOWN[1], num_warps=float(DOWN[1]["num_warps"])), ["not", "a", "config"]):
        on_card["down/16bit"] = odd
        _tuning._WARNED.clear()
        with pytest.warns(RuntimeWarning, match="not one of the declared candidates"):
            assert lora_ops._config("down", torch.bfloat16, CUDA0) == DEFAULT_DOWN
    on_card["down/16bit"] = dict(DOWN[1])
    config = lora_ops._config("down", torch.bfloat16, CUDA0)
    assert config == DOWN[1] and all(type(config[k]) is type(v) for k, v in DOWN[1].items())


def test_a_hand_edited_table_that_is_not_an_object_is_left_out_with_a_warning(tmp_path, monkeypatch):
    """A card's or a family's table of another type (a list, a string) is dropped when the file
    is read, naming it, instead of failing at the first GPU call with an AttributeError."""
    tuned, orders = tmp_path / "tuned.json", tmp_path / "orders.json"
    tuned.write_text(json.dumps({"by_device": {CARD: {"lora": ["x"], "contrastive": {}}, "Other card": "x"}}))
    orders.write_text(json.dumps({"by_device": {CARD: ["torch"], "Other card": {"lora_qkv": ["torch", "triton"]}}}))
    with pytest.warns(RuntimeWarning) as caught:
        tables = _dispatch.read_by_device(str(tuned), levels=2)
        order_tables = _dispatch.read_by_device(str(orders))
    assert tables == {CARD: {"contrastive": {}}}
    assert order_tables == {"Other card": {"lora_qkv": ["torch", "triton"]}}
    messages = [str(w.message) for w in caught]
    assert messages == [f"{tuned}: by_device / {CARD} / lora: expected a JSON object, got list; left out",
                        f"{tuned}: by_device / Other card: expected a JSON object, got str; left out",
                        f"{orders}: by_device / {CARD}: expected a JSON object, got list; left out"]
    # What is left is looked up as usual: the defaults for what was dropped.
    monkeypatch.setattr(_tuning, "_TUNED", tables)
    monkeypatch.setattr(_dispatch, "_MEASURED_ORDERS", order_tables)
    monkeypatch.setattr(_dispatch, "_cuda_device_name", lambda index: {0: CARD, 1: "Other card"}[index])
    assert lora_ops._config("down", torch.bfloat16, CUDA0) == DEFAULT_DOWN
    assert _dispatch.preference("lora_qkv", CUDA0) == _dispatch._OPS["lora_qkv"].prefer
    assert _dispatch.preference("lora_qkv", torch.device("cuda", 1))[:2] == ("torch", "triton")


def test_the_infonce_kernels_take_their_tuned_tiles(on_card):
    lse = contrastive_ops._GPU_CANDIDATES[("lse", "16bit/one_dot")]
    on_card.contrastive["lse/16bit/one_dot"] = dict(lse[2])
    config = contrastive_ops._launch_config("lse", torch.bfloat16, 512, interpreter=False, device=CUDA0)
    assert {k: config[k] for k in lse[2]} == lse[2] and config["ONE_DOT"] and config["BLOCK_D"] == 512
    # Another path (K steps at D = 1024), another card, no device (the FLOP count), the grad kernel: defaults.
    default = contrastive_ops._GPU_CONFIGS[("lse", "16bit", "one_dot")]
    for kernel, dim, device in (("lse", 1024, CUDA0), ("lse", 512, torch.device("cuda", 1)), ("lse", 512, None),
                                ("grad", 512, CUDA0)):
        config = contrastive_ops._launch_config(kernel, torch.bfloat16, dim, interpreter=False, device=device)
        path = "one_dot" if dim <= 512 else "k_steps"
        expected = contrastive_ops._GPU_CONFIGS[(kernel, "16bit", path)]
        assert {k: config[k] for k in expected} == expected, (kernel, dim, device)
    assert default != lse[2]


def test_the_shipped_file_names_only_declared_candidates():
    # Whatever a GPU run committed: every entry must be launchable (a candidate of its kernel).
    assert set(_tuning.registered()) == {"lora", "contrastive"}
    for card, families in _tuning.tuned_configs().items():
        for family, entries in families.items():
            for name, config in entries.items():
                kernel, dtype_class = name.split("/", 1)
                assert config in _tuning.candidates(family, kernel, dtype_class), (card, family, name, config)


def test_the_interpreter_takes_only_a_forced_configuration(on_card):
    on_card["down/16bit"] = dict(DOWN[1])  # a card's file entry never applies to the CPU
    cpu = torch.device("cpu")
    assert lora_ops._config("down", torch.float16, cpu) == lora_ops._INTERPRETER_CONFIGS["down"]
    with _tuning.forced("lora", "down", "16bit", DOWN[0]):
        assert lora_ops._config("down", torch.float16, cpu) == DOWN[0]
        assert lora_ops._config("down", torch.float32, cpu) == lora_ops._INTERPRETER_CONFIGS["down"]


# --------------------------------------------------------------------------- the sweep family


def _suite(tmp_path, *, gpu: bool, providers=("triton",)):
    from benchmarks.harness import Environment
    from benchmarks.suite import Suite

    class FakeGpuSuite(Suite):
        @property
        def is_gpu(self):
            return gpu

    env = Environment(device=CARD if gpu else "AMD EPYC", device_type="cuda" if gpu else "cpu", torch="t",
                      triton=None, cuda=None, git_sha="g", date="d", python="3", threads=1, load_average=None)
    return FakeGpuSuite(device=torch.device("cpu"), quick=True, json_path=str(tmp_path / "sweep.json"),
                        png_path=None, time_budget_s=600, max_seconds_per_call=0.05, providers=list(providers),
                        log=lambda _: None, environment=env)


def test_sweep_is_skipped_without_a_gpu_or_without_triton(tmp_path):
    cpu = _suite(tmp_path, gpu=False)
    bench_tuning.run(cpu)
    assert cpu.rows == [] and "triton_config_sweep: skipped (a sweep of GPU launch configurations" in cpu.skipped[0]
    no_triton = _suite(tmp_path, gpu=True, providers=("torch",))
    bench_tuning.run(no_triton)
    assert no_triton.rows == [] and "provider triton not selected" in no_triton.skipped[0]
    cheap = _suite(tmp_path, gpu=True)
    cheap.tier = "cheap"
    bench_tuning.run(cheap)
    assert cheap.rows == [] and "a costly item" in cheap.skipped[0]


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.interpreter
def test_sweep_rows_time_every_candidate_against_the_default(tmp_path, monkeypatch):
    # A smaller InfoNCE batch than a --quick run's, for the interpreter's sake: this test checks the
    # rows; each candidate's results at B = 150 are test_contrastive.test_triton_sweep_candidates_fp16's.
    monkeypatch.setattr(bench_tuning, "QUICK_CONTRASTIVE", (70, 64))
    suite = _suite(tmp_path, gpu=True)
    bench_tuning.run(suite)
    payload = json.loads((tmp_path / "sweep.json").read_text())
    rows = payload["rows"]
    plan = bench_tuning.sweep_plan()
    assert {p["kernel_family"] for p in plan} == {"lora", "contrastive"}
    assert len(rows) == sum(len(p["configs"]) for p in plan), suite.skipped
    for entry in plan:
        op = bench_tuning.OPS[entry["kernel_family"]]
        mine = [r for r in rows if r["op"] == f"{op} sweep {entry['kernel']}"]
        assert [r["metrics"]["candidate"] for r in mine] == list(range(len(entry["configs"])))
        assert [r["metrics"]["config"] for r in mine] == entry["configs"]
        assert {r["metrics"]["dtype_class"] for r in mine} == {entry["dtype_class"]}
        assert {r["metrics"]["kernel_digest"] for r in mine} == {_tuning.kernel_digest(entry["kernel_family"])}
        default, *candidates = mine
        assert default["provider"] == "triton" and default["baseline"] is None
        for number, row in enumerate(candidates, start=1):
            assert row["provider"] == f"triton+{entry['kernel']}#{number}" and row["baseline"] == "triton"
            assert row["speedup_vs_baseline"] > 0 and row["family"] == "tuning"
        # fp16 through the interpreter against fp32 references: a few fp16 roundings.
        assert all(0 < r["metrics"]["rel_err"] < 5e-3 for r in mine), mine
    # The writer refuses a --quick run; the same rows as a full run's are taken (which candidate
    # wins on interpreter times is not checked).
    with pytest.raises(ValueError, match="a --quick run"):
        tuned_configs.update(payload, None)
    payload["run"]["quick"] = False
    content, report = tuned_configs.update(payload, None)
    assert len(report) == 1 + len(plan)
    for family, entries in content["by_device"].get(CARD, {}).items():
        assert set(entries) <= {f"{p['kernel']}/{p['dtype_class']}" for p in plan if p["kernel_family"] == family}


# --------------------------------------------------------------------------- the writer


def _sweep_row(kernel, number, ms, err, config=None, family="lora", dtype_class="16bit", digest="this tree's"):
    if config is None:
        config = (_tuning.default(family, kernel, dtype_class) if number == 0
                  else _tuning.candidates(family, kernel, dtype_class)[number - 1])
    metrics = {"kernel_family": family, "kernel": kernel, "dtype_class": dtype_class, "candidate": number,
               "config": dict(config), "rel_err": err, "rel_err_against": "a reference",
               "kernel_digest": _tuning.kernel_digest(family) if digest == "this tree's" else digest}
    if err is None:
        del metrics["rel_err"]
    if digest is None:
        del metrics["kernel_digest"]
    return {"family": "tuning", "op": f"{bench_tuning.OPS[family]} sweep {kernel}", "shape": "M=12608",
            "dtype": "bfloat16", "provider": bench_tuning.provider_label(kernel, number),
            "baseline": None if number == 0 else "triton", "median_ms": ms, "metrics": metrics}


def _payload(rows, device=CARD, device_type="cuda"):
    return {"environment": {"device": device, "device_type": device_type, "git_sha": "abc", "date": "2026-11-29"},
            "rows": rows}


def test_writer_picks_the_fastest_qualifying_candidate():
    rows = [
        # down: #2 is fastest but its error is too large; #4 is no longer declared; #1 wins.
        _sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 1, 9.0, 0.005),
        _sweep_row("down", 2, 8.0, 0.02), _sweep_row("down", 3, 9.5, 0.004),
        _sweep_row("down", 4, 7.0, 0.004, config=dict(DEFAULT_DOWN, BLOCK_K=512)),
        # backward: the fastest candidate is within the margin; the card's old entry is removed.
        _sweep_row("backward", 0, 10.0, 0.004), _sweep_row("backward", 1, 9.8, 0.004),
        # the InfoNCE lse kernel: its default did not run; nothing to compare with, the old entry stays.
        _sweep_row("lse", 1, 1.0, 0.004, family="contrastive", dtype_class="16bit/one_dot"),
        # the InfoNCE gradient kernel: candidate #3 wins, in its own family's entries.
        _sweep_row("grad", 0, 4.0, 0.003, family="contrastive", dtype_class="16bit/one_dot"),
        _sweep_row("grad", 3, 3.0, 0.003, family="contrastive", dtype_class="16bit/one_dot"),
    ]
    old_backward = dict(lora_ops._GPU_CANDIDATES[("backward", "16bit")][2])
    old_lse = dict(contrastive_ops._GPU_CANDIDATES[("lse", "16bit/one_dot")][0])
    existing = {"about": "kept", "by_device": {
        CARD: {"lora": {"backward/16bit": old_backward, "mask/16bit": {"kept": True}},
               "contrastive": {"lse/16bit/one_dot": old_lse}},
        "Other card": {"lora": {"down/16bit": dict(DOWN[2])}}}}
    content, report = tuned_configs.update(_payload(rows), existing)
    lora = content["by_device"][CARD]["lora"]
    assert lora == {"down/16bit": DOWN[0], "mask/16bit": {"kept": True}}  # kernels not swept keep theirs
    assert content["by_device"][CARD]["contrastive"] == {
        "grad/16bit/one_dot": contrastive_ops._GPU_CANDIDATES[("grad", "16bit/one_dot")][2],
        "lse/16bit/one_dot": existing["by_device"][CARD]["contrastive"]["lse/16bit/one_dot"]}
    assert content["by_device"]["Other card"] == existing["by_device"]["Other card"] and content["about"] == "kept"
    text = "\n".join(report)
    assert "lora down/16bit: candidate #1" in text and "takes 0.900x the default's 10 ms" in text
    assert "contrastive grad/16bit/one_dot: candidate #3" in text
    assert "#2 error 0.02 > min(2 x default's 0.004 + 1e-4, 0.03)" in text
    assert "#4 is no longer a declared candidate" in text
    assert "lora backward/16bit: fastest candidate #1 takes 0.980x the default's 10 ms, not 3% less" in text
    assert "contrastive lse/16bit/one_dot: the default was not measured; nothing to compare with, the file's entry " \
           "stays" in text
    # Nothing left for a card: its entry goes.
    content, _ = tuned_configs.update(_payload([_sweep_row("down", 0, 10.0, 0.004)]),
                                      {"by_device": {CARD: {"lora": {"down/16bit": dict(DOWN[0])}}}})
    assert content["by_device"] == {}


def test_writer_command_line(tmp_path):
    results, out = tmp_path / "run.json", tmp_path / "tuned.json"
    results.write_text(json.dumps(_payload([_sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 3, 5.0, 0.004)])))
    assert tuned_configs.main([str(results), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["by_device"][CARD]["lora"] == {"down/16bit": DOWN[2]}
    assert "about" in written  # the package's file was the base
    results.write_text(json.dumps(_payload([_sweep_row("down", 0, 10.0, 0.004)], device="AMD EPYC",
                                           device_type="cpu")))
    assert tuned_configs.main([str(results), "--out", str(out)]) == 2
    before = out.read_text()
    results.write_text(json.dumps(_payload([{"family": "lora", "op": "lora_qkv", "shape": "M=12608",
                                             "dtype": "bfloat16", "provider": "triton", "median_ms": 1.0,
                                             "metrics": {"kernel": "down"}}])))
    assert tuned_configs.main([str(results), "--out", str(out)]) == 3
    assert out.read_text() == before  # nothing written


def test_writer_leaves_a_file_that_holds_its_content_already(tmp_path, capsys):
    # A second run of the tool on the same result file would write what the file holds: it says
    # "unchanged" and leaves the file alone (the same inode), where it said "written" and replaced it.
    results, out = tmp_path / "run.json", tmp_path / "tuned.json"
    results.write_text(json.dumps(_payload([_sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 3, 5.0, 0.004)])))
    assert tuned_configs.main([str(results), "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith(f"written: {out}\n")
    inode, before = os.stat(out).st_ino, out.read_text()
    assert tuned_configs.main([str(results), "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith(f"unchanged: {out}\n")
    assert (os.stat(out).st_ino, out.read_text()) == (inode, before)
    # Another content (the candidate no longer faster): written again.
    results.write_text(json.dumps(_payload([_sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 3, 9.9, 0.004)])))
    assert tuned_configs.main([str(results), "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith(f"written: {out}\n")
    assert "lora" not in json.loads(out.read_text())["by_device"].get(CARD, {})
    # A new file from the package's own (gpu_check.sh's --out under $OUT) that holds what the package's does:
    # written, and said to be the same (nothing to commit over it).
    fresh = tmp_path / "fresh.json"
    results.write_text(json.dumps(_payload([_sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 3, 9.9, 0.004)],
                                           device="NVIDIA B300")))
    assert tuned_configs.main([str(results), "--out", str(fresh)]) == 0
    assert capsys.readouterr().out.endswith(f"written: {fresh} (the same as {_tuning.TUNED_FILE}, which it updates)\n")
    assert fresh.read_text() == open(_tuning.TUNED_FILE, encoding="utf-8").read()


def test_writer_takes_nothing_when_the_default_has_no_finite_error():
    # A default whose check gave inf or NaN, or an error over the dtype's check limit (0.03 in
    # bf16), or no check at all, bounds nothing: no candidate may be written, and what the file
    # held for the kernel stays (a failing run is no ground to change an earlier one's choice).
    held = {"by_device": {CARD: {"lora": {"down/16bit": dict(DOWN[2])}}}}
    for error in (float("inf"), float("nan"), 0.5, None):
        rows = [_sweep_row("down", 0, 10.0, error), _sweep_row("down", 1, 5.0, 0.001)]
        content, report = tuned_configs.update(_payload(rows), {"by_device": {}})
        assert content["by_device"] == {}
        content, report = tuned_configs.update(_payload(rows), held)
        assert content == held
        assert ("the default's output was not checked" if error is None
                else "is over the check limit 0.03; nothing qualifies, the file's entry stays") in "\n".join(report)
    # Within twice the default's error, but over the limit: not taken.
    rows = [_sweep_row("down", 0, 10.0, 0.02), _sweep_row("down", 1, 5.0, 0.035)]
    content, report = tuned_configs.update(_payload(rows), {"by_device": {}})
    assert content["by_device"] == {} and "#1 error 0.035 > min(" in "\n".join(report)


def test_writer_takes_only_candidates_whose_output_was_checked():
    """A candidate row without an error (its output was never compared with the reference) may
    be wrong however fast it is: it is not written, and the report says why."""
    rows = [_sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 1, 5.0, None)]
    content, report = tuned_configs.update(_payload(rows), None)
    assert content["by_device"] == {}
    assert "lora down/16bit: no qualifying candidate; the default stays (#1's output was not checked)" in report[1]


def test_writer_writes_declared_configurations_type_for_type():
    """The runtime takes a file entry only when it equals a declared configuration type for type
    (JSON's 8.0 and true equal 8 and 1 but fail a launch): a result row whose configuration equals
    a candidate only up to number types is not written (every launch would refuse it), and what
    is written holds the declared configuration's own types."""
    lse = contrastive_ops._GPU_CANDIDATES[("lse", "16bit/one_dot")]
    number, one_stage = next((n, c) for n, c in enumerate(lse, start=1) if c["num_stages"] == 1)
    on_lse = dict(family="contrastive", dtype_class="16bit/one_dot")
    cases = {"lora down/16bit": [_sweep_row("down", 0, 10.0, 0.004),
                                 _sweep_row("down", 1, 5.0, 0.004, config=dict(DOWN[0], num_warps=8.0))],
             "contrastive lse/16bit/one_dot": [_sweep_row("lse", 0, 10.0, 0.004, **on_lse),
                                               _sweep_row("lse", number, 5.0, 0.004, **on_lse,
                                                          config=dict(one_stage, num_stages=True))]}
    assert DOWN[0]["num_warps"] == 8
    for name, rows in cases.items():
        content, report = tuned_configs.update(json.loads(json.dumps(_payload(rows))), None)
        assert content["by_device"] == {}, name
        assert report[1].startswith(f"  {name}: no qualifying candidate") and \
            "holds other number types than the declared candidate" in report[1], report
    rows = [_sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 1, 5.0, 0.004)]
    content, _ = tuned_configs.update(json.loads(json.dumps(_payload(rows))), None)
    written = content["by_device"][CARD]["lora"]["down/16bit"]
    assert written == DOWN[0] and all(type(written[k]) is type(v) for k, v in DOWN[0].items())


def test_writer_takes_a_sweep_of_this_trees_kernels_and_default_only():
    """A result file of other kernels (an older run: no digest, or another one) or of another
    default configuration says nothing about this tree's: the file's entry stays."""
    held = {"by_device": {CARD: {"lora": {"down/16bit": dict(DOWN[2])}}}}
    cases = {"the run predates the record of them": dict(digest=None),
             "their sources differ": dict(digest="0123456789abcdef")}
    for why, kw in cases.items():
        rows = [_sweep_row("down", 0, 10.0, 0.004, **kw), _sweep_row("down", 1, 5.0, 0.004, **kw)]
        content, report = tuned_configs.update(_payload(rows), held)
        assert content == held
        assert f"lora down/16bit: the sweep timed other lora kernels than this tree's ({why})" in "\n".join(report)
    rows = [_sweep_row("down", 0, 10.0, 0.004, config=dict(DEFAULT_DOWN, num_warps=1)),
            _sweep_row("down", 1, 5.0, 0.004)]
    content, report = tuned_configs.update(_payload(rows), held)
    assert content == held and "lora down/16bit: the sweep's default" in "\n".join(report)
    # The digest covers every Triton kernel of the family's module, and only those.
    assert _tuning.kernel_digest("lora") != _tuning.kernel_digest("contrastive")
    assert _tuning.kernel_digest("no such family") is None


def test_the_kernel_digest_reads_the_jit_functions_of_the_file_as_imported(tmp_path, monkeypatch):
    source = tmp_path / "kernels.py"

    def digest(text):
        source.write_text(text)
        monkeypatch.setitem(_tuning._SOURCES, "toy", (str(source), _tuning._file_stamp(str(source))))
        _tuning.kernel_digest.cache_clear()
        return _tuning.kernel_digest("toy")

    kernel = "@triton.jit\ndef k(x):\n    return x + 1\n"
    base = digest(f"import triton\n{kernel}")
    # What is not a kernel does not count: other functions, comments, the kernel's position.
    assert digest(f"import triton\n# a note\n\ndef helper():\n    pass\n\n{kernel}") == base
    assert digest(f"import triton\nif triton is not None:\n    {kernel.replace(chr(10), chr(10) + '    ')}") == base
    assert digest(f"import triton\n{kernel.replace('x + 1', 'x + 2')}") != base
    # Only triton's jit: another library's jit decorator does not make a kernel.
    assert digest(f"import triton\nimport numba\n{kernel}\n@numba.jit\ndef other(y):\n    return y\n") == base
    # Kernels count by name, not by their order in the file.
    second = "@triton.jit\ndef a(y):\n    return y * 2\n"
    assert digest(f"import triton\n{kernel}\n{second}") == digest(f"import triton\n{second}\n{kernel}")
    # A kernel decorated with arguments, @triton.jit(...), is one too.
    called = kernel.replace("@triton.jit", "@triton.jit(do_not_specialize=['x'])")
    assert digest(f"import triton\n{called}") != digest(f"import triton\n{called.replace('x + 1', 'x + 2')}")
    # Changed on disk after the import: refused, not the digest of other kernels than the loaded ones.
    digest(f"import triton\n{kernel}")
    source.write_text(f"import triton\n{kernel}\n# edited since\n")
    _tuning.kernel_digest.cache_clear()
    with pytest.raises(RuntimeError, match="changed since it was imported"):
        _tuning.kernel_digest("toy")
    _tuning.kernel_digest.cache_clear()


def test_writers_refuse_a_quick_run(tmp_path, capsys):
    from benchmarks import dispatch_order

    payload = _payload([_sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 3, 5.0, 0.004)])
    payload["run"] = {"quick": True}
    results = tmp_path / "run.json"
    results.write_text(json.dumps(payload))
    for tool in (tuned_configs, dispatch_order):
        assert tool.main([str(results), "--out", str(tmp_path / "out.json")]) == 2
        assert "a --quick run" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
    # An --out that cannot be written: one line, not a traceback.
    payload["run"] = {"quick": False}
    results.write_text(json.dumps(payload))
    assert tuned_configs.main([str(results), "--out", str(results / "x.json")]) == 2
    assert "argument --out: cannot write" in capsys.readouterr().err


def test_writer_bounds_at_their_edges():
    """The writer's bounds, at their edges: a candidate exactly 3% faster than the default is
    taken (at least MARGIN less), one a hair slower than that is not; an error at most twice the
    default's plus 1e-4 qualifies, one above does not; the check limit is the row dtype's
    (float16's 1e-2, not bf16's 3e-2)."""
    def chosen(rows):
        content, report = tuned_configs.update(_payload(rows), None)
        return content["by_device"].get(CARD, {}).get("lora", {}).get("down/16bit"), "\n".join(report)

    assert chosen([_sweep_row("down", 0, 100.0, 0.004), _sweep_row("down", 1, 97.0, 0.004)])[0] == DOWN[0]
    assert chosen([_sweep_row("down", 0, 100.0, 0.004), _sweep_row("down", 1, 97.01, 0.004)])[0] is None
    assert chosen([_sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 1, 5.0, 0.0081)])[0] == DOWN[0]
    config, report = chosen([_sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 1, 5.0, 0.0085)])
    assert config is None and "#1 error 0.0085 > min(2 x default's 0.004 + 1e-4, 0.03)" in report

    def fp16(row):
        return dict(row, dtype="float16")

    config, report = chosen([fp16(_sweep_row("down", 0, 10.0, 0.009)), fp16(_sweep_row("down", 1, 5.0, 0.012))])
    assert config is None and "#1 error 0.012 > min(2 x default's 0.009 + 1e-4, 0.01)" in report
    held = {"by_device": {CARD: {"lora": {"down/16bit": dict(DOWN[2])}}}}
    rows = [fp16(_sweep_row("down", 0, 10.0, 0.015)), fp16(_sweep_row("down", 1, 5.0, 0.001))]
    content, report = tuned_configs.update(_payload(rows), held)
    assert content == held and "is over the check limit 0.01" in "\n".join(report)
    # A default exactly at the row dtype's limit (bf16's 0.03) is correct: it bounds its candidates.
    assert chosen([_sweep_row("down", 0, 10.0, 0.03), _sweep_row("down", 1, 5.0, 0.03)])[0] == DOWN[0]


def test_writer_passes_over_rows_that_were_not_timed():
    """A row without a time (its measurement did not run) is no ground for a choice: a default
    without one keeps the file's entry, a candidate without one is passed over for a timed one."""
    held = {"by_device": {CARD: {"lora": {"down/16bit": dict(DOWN[2])}}}}
    content, report = tuned_configs.update(_payload([_sweep_row("down", 0, None, 0.004),
                                                     _sweep_row("down", 1, 5.0, 0.004)]), held)
    assert content == held and "lora down/16bit: the default was not measured" in report[1]
    rows = [_sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 1, None, 0.004), _sweep_row("down", 2, 6.0, 0.004)]
    content, report = tuned_configs.update(_payload(rows), None)
    assert content["by_device"][CARD]["lora"] == {"down/16bit": DOWN[1]} and "candidate #2" in report[1]
    content, report = tuned_configs.update(_payload(rows[:2]), held)
    assert content["by_device"] == {} and "no qualifying candidate; the default stays" in report[1]


def test_writer_reads_only_the_tuning_familys_rows():
    """Only rows of family ``tuning`` are sweep rows: another family's row that happens to carry
    the same metrics neither bounds nor wins anything."""
    stray = dict(_sweep_row("down", 1, 1.0, 0.0), family="lora")
    content, report = tuned_configs.update(_payload([_sweep_row("down", 0, 10.0, 0.004), stray]), None)
    assert content["by_device"] == {} and "no qualifying candidate" in report[1]
    with pytest.raises(tuned_configs.NoSweep):
        tuned_configs.update(_payload([dict(_sweep_row("down", 0, 10.0, 0.004), family="lora")]), None)


def test_writer_names_a_sweep_rows_missing_metric_and_passes_over_a_config_that_is_no_object():
    """A sweep row without one of its metrics is refused with its name; a candidate whose config is
    not an object (a hand-edited file) is no declared candidate."""
    broken = _sweep_row("down", 1, 5.0, 0.004)
    del broken["metrics"]["config"]
    with pytest.raises(ValueError, match=r"row 1 \(lora_qkv sweep down\) is a sweep row without metrics 'config'"):
        tuned_configs.update(_payload([_sweep_row("down", 0, 10.0, 0.004), broken]), None)
    for config in (None, [1, 2]):
        row = _sweep_row("down", 1, 5.0, 0.004)
        row["metrics"]["config"] = config
        content, report = tuned_configs.update(_payload([_sweep_row("down", 0, 10.0, 0.004), row]), None)
        assert content["by_device"] == {} and "(#1 is no longer a declared candidate)" in report[1]


def test_writer_leaves_the_existing_content_unchanged_and_reports_in_sorted_order():
    """update() builds new content (the caller's dict is not edited in place) and reports the
    kernels in a fixed order, whatever the order of the rows."""
    existing = {"by_device": {CARD: {"lora": {"backward/16bit": dict(DOWN[0]), "mask/16bit": {"kept": True}}}}}
    before = json.loads(json.dumps(existing))
    rows = [_sweep_row("down", 0, 10.0, 0.004), _sweep_row("down", 1, 5.0, 0.004),
            _sweep_row("backward", 0, 10.0, 0.004), _sweep_row("backward", 1, 9.9, 0.004)]
    content, report = tuned_configs.update(_payload(rows), existing)
    assert existing == before and content["by_device"][CARD]["lora"] == {"down/16bit": DOWN[0],
                                                                         "mask/16bit": {"kept": True}}
    assert [line.split(":")[0] for line in report[1:]] == ["  lora backward/16bit", "  lora down/16bit"]


def test_sweep_stops_at_the_budget_between_kernel_families_and_kernels(tmp_path, monkeypatch):
    """Out of time for a kernel family: its inputs are not even made; out of time before a kernel:
    the sweep ends there (what was measured before is kept)."""
    suite = _suite(tmp_path, gpu=True)
    asked, made = [], []
    plan = bench_tuning.sweep_plan()
    first_contrastive = next(p["kernel"] for p in plan if p["kernel_family"] == "contrastive")

    def out_of_time(what):
        asked.append(what)
        return what == f"{bench_tuning.ITEM} lora" or what.startswith(f"{bench_tuning.ITEM} contrastive ")

    monkeypatch.setattr(suite, "out_of_time", out_of_time)
    for family in ("lora", "contrastive"):
        monkeypatch.setitem(bench_tuning.CASES, family, lambda suite_, dtype, family=family: (
            made.append(family), ("B=8", None, None, [], "nothing"))[1])
    bench_tuning.run(suite)
    assert made == ["contrastive"] and suite.rows == []
    assert asked == [bench_tuning.ITEM, f"{bench_tuning.ITEM} lora", f"{bench_tuning.ITEM} contrastive",
                     f"{bench_tuning.ITEM} contrastive {first_contrastive}"]


def test_sweep_checks_each_candidate_at_its_own_configuration(tmp_path, monkeypatch):
    """A candidate's error is measured with that candidate forced, not the default."""
    suite = _suite(tmp_path, gpu=True)
    entry = next(p for p in bench_tuning.sweep_plan() if p["kernel_family"] == "lora")
    entry = dict(entry, configs=entry["configs"][:2])
    monkeypatch.setattr(bench_tuning, "sweep_plan", lambda: [entry])

    def check():  # an "error" that names the configuration in force: its place in the plan
        return float(entry["configs"].index(_tuning.forced_config("lora", entry["kernel"], entry["dtype_class"])))

    monkeypatch.setitem(bench_tuning.CASES, "lora", lambda suite_, dtype: ("M=8", check, lambda: None, [], "nothing"))
    bench_tuning.run(suite)
    rows = [r for r in suite.rows if r.op.endswith(f"sweep {entry['kernel']}")]
    assert entry["configs"][0] != entry["configs"][1]
    assert sorted(r.metrics["rel_err"] for r in rows) == [0.0, 1.0]


@pytest.mark.parametrize("module", ["tuned_configs", "dispatch_order"])
def test_the_writers_help_states_their_whole_first_paragraph(module, capsys):
    # The description was the docstring's first line, which ends mid-sentence ("the launch
    # configurations that the sweep of"): --help must say what the tool writes and where.
    import importlib

    tool = importlib.import_module(f"benchmarks.{module}")
    with pytest.raises(SystemExit) as stop:
        tool.main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"written into ace_kernels/{module}.json" in text.replace("``", "")
