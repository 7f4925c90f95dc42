"""tools/gpu_check.py (`./dev.sh gpu-check`): the dry run, the runner, the summary, junit and sanitizer parsing,
and the run without a GPU. Nothing here builds or needs a GPU: nvidia-smi is faked or pointed at nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gc = _load()
NO_GPU = "/nonexistent/nvidia-smi"


@pytest.fixture
def fake_smi(tmp_path):
    """An nvidia-smi that lists one H200."""
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\necho 'NVIDIA H200, 9.0, 580.65.06, 143771 MiB'\n")
    path.chmod(0o755)
    return str(path)


def _run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_dry_run_lists_every_step_in_order_with_its_command(tmp_path, fake_smi):
    out = tmp_path / "results"
    r = _run(str(out), "--dry-run", "--nvidia-smi", fake_smi, "--python", "python3")
    assert r.returncode == 0, r.stderr
    assert not out.exists()  # nothing was run or written
    steps = gc.plan(out, "python3", "9.0", gc.cpu_count(), gc.find_sanitizer(), fake_smi)
    names = ["nvidia-smi", "build", "info", "pytest-cuda", "memcheck", "racecheck", "benchmarks", "bench-report"]
    assert [s.name for s in steps] == names
    lines = r.stdout.splitlines()
    headers = [i for i, ln in enumerate(lines) if re.match(r"\[\d+/\d+\] ", ln)]
    assert [lines[i].split()[1].rstrip(":") for i in headers] == names
    for i, step in zip(headers, steps):
        assert f"limit {step.limit_s} s" in lines[i]
        assert lines[i + 1].strip() == step.shell()
    text = r.stdout
    assert f"OUT_DIR: {out}" in text and "GPU: NVIDIA H200 (compute capability 9.0)" in text
    assert f"TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 TORCH_WSL_CPU_ONLY=0 MAX_JOBS={gc.cpu_count()} python3 setup.py " \
           "build_ext --inplace" in text
    assert "--tool memcheck" in text and "--tool racecheck" in text and "--device cuda --quick" in text
    assert f"--junitxml {out / 'pytest-cuda.xml'}" in text and "-k 'cuda or " in text


def test_dry_run_through_dev_sh_without_a_gpu():
    r = subprocess.run(["bash", str(ROOT / "dev.sh"), "gpu-check", "--dry-run", "--nvidia-smi", NO_GPU],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert "GPU: none (/nonexistent/nvidia-smi not found)" in r.stdout
    assert f"OUT_DIR: {ROOT / 'gpu-check-results'}" in r.stdout
    assert "[8/8] bench-report" in r.stdout


def test_sanitizer_subsets_name_existing_cuda_tests():
    for node in gc.MEMCHECK_TESTS + gc.RACECHECK_TESTS:
        path, name = node.split("::")
        assert node.endswith("cuda]") or "cuda" in name, node
        assert f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), node
    for name in gc.UNMARKED_GPU_TESTS:
        assert any(f"def {name}(" in p.read_text() for p in (ROOT / "tests").glob("test_*.py")), name


def test_without_a_gpu_the_run_says_so_writes_the_summary_and_fails(tmp_path):
    out = tmp_path / "results"
    r = _run(str(out), "--nvidia-smi", NO_GPU)
    assert r.returncode != 0
    assert "no NVIDIA GPU found (/nonexistent/nvidia-smi not found); nothing was run" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "no GPU" and summary["ok"] is False
    assert {s["status"] for s in summary["steps"]} == {"not run"}
    md = (out / "summary.md").read_text()
    assert md.startswith("# torch_wsl GPU check: NO GPU") and "no NVIDIA GPU found" in md
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "summary.md"]  # no step ran


def test_gpu_query(tmp_path, fake_smi):
    gpus, why = gc.query_gpus(fake_smi)
    assert why == "" and gpus == [{"name": "NVIDIA H200", "compute_cap": "9.0", "driver": "580.65.06",
                                   "memory": "143771 MiB"}]
    assert gc.arch_list(gpus + [dict(gpus[0], compute_cap="12.0"), dict(gpus[0], compute_cap="8.6")]) == "8.6;9.0;12.0"
    broken = tmp_path / "broken-smi"
    broken.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the driver\"\nexit 9\n")
    broken.chmod(0o755)
    gpus, why = gc.query_gpus(str(broken))
    assert gpus == [] and why.startswith(f"{broken} failed (exit 9): NVIDIA-SMI has failed")


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="6" time="3.2">
  <testcase classname="tests.test_norm" name="test_forward_matches_reference[b5-n1-wb-layer_norm-fp32-cuda]" time="0.1"/>
  <testcase classname="tests.test_norm" name="test_opcheck[cuda]" time="0.5"/>
  <testcase classname="tests.test_optim" name="test_cuda_many_tensors_span_several_launches" time="0.2">
    <failure message="AssertionError: Tensor-likes are not close!&#10;&#10;Mismatched elements: 3 / 37 (8.1%)&#10;Greatest absolute difference: 0.5&#10;more&#10;  AttributeError: no cuda_install&#10;assert 1 == 0">traceback text</failure>
  </testcase>
  <testcase classname="tests.test_clip_grad" name="test_opcheck[cuda]" time="0.0">
    <error message="failed on setup with &quot;RuntimeError: CUDA error: out of memory&quot;">setup traceback</error>
  </testcase>
  <testcase classname="tests.test_norm" name="test_every_cpu_isa[avx512]" time="0.0">
    <skipped type="pytest.skip" message="CPU lacks avx512">skipped</skipped>
  </testcase>
  <testcase classname="tests.test_memory.TestThing" name="test_x" time="0.0">
    <skipped type="pytest.xfail" message="expected" />
  </testcase>
  <testcase time="0.000" />
</testsuite></testsuites>
"""


def test_junit_parser_counts_pass_fail_error_skip(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    t = gc.parse_junit(path)
    assert (t["found"], t["total"], t["passed"], t["failed"], t["errors"], t["skipped"]) == (True, 6, 2, 1, 1, 2)
    assert t["interrupted"] == 1  # the test SIGINT stopped: pytest writes it as an empty <testcase/>
    assert t["failures"] == [
        {"name": "tests/test_optim.py::test_cuda_many_tensors_span_several_launches", "kind": "failure",
         "message": "AssertionError: Tensor-likes are not close!\nMismatched elements: 3 / 37 (8.1%)\n"
                    "Greatest absolute difference: 0.5\nAttributeError: no cuda_install"},  # + the cause below
        {"name": "tests/test_clip_grad.py::test_opcheck[cuda]", "kind": "error",
         "message": 'failed on setup with "RuntimeError: CUDA error: out of memory"'},
    ]
    assert gc._nodeid("tests.test_memory.TestThing", "test_x") == "tests/test_memory.py::TestThing::test_x"
    missing = gc.parse_junit(tmp_path / "none.xml")
    assert missing["found"] is False and missing["total"] == 0 and "no junit XML" in missing["note"]
    (tmp_path / "cut.xml").write_text(JUNIT[:200])
    assert gc.parse_junit(tmp_path / "cut.xml")["found"] is False


MEMCHECK_LOG = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 16 bytes
=========     at void rms_norm_fwd_kernel<float>(...)+0x1f0 in /repo/csrc/cuda/norm_kernels.cu:131
=========     by thread (7,0,0) in block (1,0,0)
=========     Address 0x7f0000001004 is out of bounds
=========
========= Invalid __global__ read of size 16 bytes
=========     at void rms_norm_fwd_kernel<float>(...)+0x1f0 in /repo/csrc/cuda/norm_kernels.cu:131
=========
========= Target application returned an error
========= ERROR SUMMARY: 2 errors
"""
RACECHECK_LOG = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at norm_param_grad_partial_kernel<float>(...)+0x90 in norm_kernels.cu:247
=========     and Read access at norm_param_grad_partial_kernel<float>(...)+0x120 in norm_kernels.cu:252 [64 hazards]
=========
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""


def test_sanitizer_parser(tmp_path):
    (tmp_path / "m.log").write_text(MEMCHECK_LOG)
    m = gc.parse_sanitizer(tmp_path / "m.log")
    assert m["errors"] == 2 and m["summaries"] == ["ERROR SUMMARY: 2 errors"] and m["findings_total"] == 2
    assert m["findings"][0].splitlines() == [
        "Invalid __global__ read of size 16 bytes",
        "at void rms_norm_fwd_kernel<float>(...)+0x1f0 in /repo/csrc/cuda/norm_kernels.cu:131",
        "by thread (7,0,0) in block (1,0,0)",
        "Address 0x7f0000001004 is out of bounds",
    ]
    (tmp_path / "r.log").write_text(RACECHECK_LOG)
    r = gc.parse_sanitizer(tmp_path / "r.log")
    assert (r["errors"], r["warnings"], r["findings_total"]) == (1, 0, 1)
    assert r["findings"][0].startswith("Error: Race reported between Write access")
    (tmp_path / "clean.log").write_text("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    clean = gc.parse_sanitizer(tmp_path / "clean.log")
    assert (clean["errors"], clean["findings"], clean["found"]) == (0, [], True)
    assert gc.parse_sanitizer(tmp_path / "none.log")["found"] is False


def test_summary_from_fake_results_including_failed_and_timed_out_steps(tmp_path):
    out = tmp_path
    (out / "junit.xml").write_text(JUNIT)
    (out / "m.log").write_text(MEMCHECK_LOG)
    (out / "logs").mkdir()
    (out / "logs" / "nvidia-smi.log").write_text("| NVIDIA H200  On | 00000000:18:00.0 Off |\n")
    (out / "info.json").write_text(json.dumps({"torch": "2.11.0+cu130", "torch_cuda": "13.0", "gpu": "NVIDIA H200",
                                               "torch_wsl": {"cuda_kernels": True, "cuda_archs": "9.0"}}) + "\n")
    (out / "benchmarks.json").write_text(json.dumps({"schema_version": 1, "results": []}, indent=2))
    (out / "benchmarks.md").write_text("| op | mode |\n|---|---|\n| rms_norm | fwd |\n")
    S = gc.StepResult
    results = [
        S("nvidia-smi", "GPU", "nvidia-smi", 15, 15, "passed", 0, 0.1, "logs/nvidia-smi.log"),
        S("build", "build", "python3 setup.py build_ext --inplace", 210, 210, "passed", 0, 95.2, "logs/build.log"),
        S("pytest-cuda", "tests", "python3 -m pytest ...", 150, 150, "failed", 1, 80.0, "logs/pytest-cuda.log",
          tests=gc.parse_junit(out / "junit.xml"), tail=["1 failed, 2 passed"]),
        S("memcheck", "memcheck", "compute-sanitizer ...", 90, 61, "timed out", 124, 61.3, "logs/memcheck.log",
          tests=gc.parse_junit(out / "missing.xml"), sanitizer=gc.parse_sanitizer(out / "m.log"),
          note="stopped at its limit of 61 s", tail=["collected 10 items"]),
        S("benchmarks", "bench", "python3 -m benchmarks ...", 120, 100, "passed", 0, 20.0, "logs/benchmarks.log"),
        S("bench-report", "report", "python3 -m benchmarks.report ...", 20, 20, "passed", 0, 1.0, "logs/r.log"),
        S("racecheck", "racecheck", "compute-sanitizer ...", 90, None, "not run", note="the run's time budget was spent"),
    ]
    gpus = [{"name": "NVIDIA H200", "compute_cap": "9.0", "driver": "580.65.06", "memory": "143771 MiB"}]
    summary = gc.build_summary(results, out, gpus, wall_s=259.6, python="python3")
    js, md = gc.write_summary(out, summary)
    doc = json.loads(js.read_text())
    assert doc["status"] == "failed" and doc["ok"] is False
    assert doc["message"] == "3 of 7 steps did not pass: pytest-cuda, memcheck, racecheck"
    assert [s["status"] for s in doc["steps"]] == ["passed", "passed", "failed", "timed out", "passed", "passed",
                                                   "not run"]
    assert doc["steps"][2]["tests"]["failed"] == 1 and doc["steps"][3]["sanitizer"]["errors"] == 2
    assert (doc["torch"], doc["gpu_name"], doc["build_info"]["cuda_archs"]) == ("2.11.0+cu130", "NVIDIA H200", "9.0")
    assert doc["benchmarks"] == {"schema_version": 1, "results": []} and "rms_norm" in doc["benchmarks_markdown"]
    assert "NVIDIA H200  On" in doc["nvidia_smi"]
    text = md.read_text()
    assert text.startswith("# torch_wsl GPU check: FAILED\n")
    table = [ln for ln in text.splitlines() if ln.startswith("| ") and ln.count("|") == 9]
    assert len(table) == 1 + len(results)  # header + one row per step, 8 cells each
    assert "| 4 | memcheck | timed out | 124 | 61.3 | 61 | no junit XML | ERROR SUMMARY: 2 errors |" in text
    assert "| 7 | racecheck | not run (the run's time budget was spent) |" in text
    assert "- `tests/test_optim.py::test_cuda_many_tensors_span_several_launches` (failure): AssertionError" in text
    assert "### memcheck: timed out (stopped at its limit of 61 s)" in text
    assert "Invalid __global__ read of size 16 bytes" in text and "## Benchmarks" in text
    assert '"cuda_archs": "9.0"' in text and "## nvidia-smi" in text


SKIPPED_ONLY = '<testsuites><testsuite><testcase classname="t" name="a"><skipped message="no GPU"/></testcase>' \
               '</testsuite></testsuites>'


def test_runner_passes_fails_and_times_out_steps_and_keeps_going(tmp_path):
    py = sys.executable
    junit = tmp_path / "skips.xml"
    steps = [
        gc.Step("ok", "prints JSON", [py, "-c", "print('{\"a\": 1}')"], 20, 1, stdout_to=str(tmp_path / "ok.json")),
        gc.Step("bad", "exits 3", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 20, 1),
        gc.Step("slow", "sleeps past its limit", [py, "-c", "import time; time.sleep(30)"], 1, 1),
        gc.Step("after", "still runs", [py, "-c", "pass"], 20, 1),
        gc.Step("skips", "every test skipped", [py, "-c", f"open({str(junit)!r}, 'w').write({SKIPPED_ONLY!r})"], 20, 1,
                junit=str(junit)),
    ]
    results, interrupted = gc.run_all(steps, tmp_path, budget_s=100)
    assert not interrupted
    assert [(r.name, r.status, r.exit_code) for r in results] == [
        ("ok", "passed", 0), ("bad", "failed", 3), ("slow", "timed out", 124), ("after", "passed", 0),
        ("skips", "failed", 0)]
    assert results[4].note == "no test passed (1 skipped)"  # nothing was checked: not a pass
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}
    assert results[1].tail == ["boom"] and (tmp_path / "logs" / "bad.log").read_text() == "boom\n"
    assert results[2].wall_s < 10 and results[2].effective_limit_s == 1


def test_time_budget_keeps_the_later_steps_minimums():
    steps = [gc.Step(n, n, ["true"], limit, reserve) for n, limit, reserve in
             [("a", 200, 60), ("b", 150, 40), ("c", 90, 30)]]
    assert gc.effective_limit(steps, 0, 450) == 200  # plenty left: its own limit
    assert gc.effective_limit(steps, 0, 200) == 130  # 200 s left, 70 kept for b and c
    assert gc.effective_limit(steps, 1, 60) == 40  # never under its own minimum while the budget lasts...
    assert gc.effective_limit(steps, 2, 20) == 20  # ...nor past the budget
    assert sum(s.reserve_s for s in gc.plan(Path("/o"), "python3", "9.0", 16, "cs")) < gc.DEFAULT_BUDGET_S
