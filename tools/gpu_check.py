#!/usr/bin/env python3
"""./dev.sh gpu-check [OUT_DIR] [--dry-run]: build torch_wsl on a CUDA machine and run everything that needs the GPU.

Steps, in order (each with its own time limit; one that fails or times out
does not stop the others):

  nvidia-smi    the GPU, driver and memory, for the record
  build         the extension in place for this GPU's architecture only
                (TORCH_CUDA_ARCH_LIST from nvidia-smi's compute_cap, FORCE_CUDA=1,
                MAX_JOBS = every core): `python setup.py build_ext --inplace`,
                no pip, no network
  info          torch's version and GPU, torch_wsl.build_info()
  pytest-cuda   every CUDA test (the `cuda` marker, and the few unmarked tests
                that take a GPU branch), junit XML
  memcheck      a few CUDA tests under compute-sanitizer --tool memcheck
  racecheck     the reduction kernels' tests under compute-sanitizer --tool racecheck
  benchmarks    python -m benchmarks --device cuda --quick (JSON)
  bench-report  python -m benchmarks.report (the JSON as a markdown table)

Then OUT_DIR (default gpu-check-results/) holds summary.json and summary.md,
every step's log (logs/), the junit XML files, the sanitizers' logs and the
benchmark JSON. The exit code is 0 only if every step passed.

The whole run stays under 8 minutes: it has a time budget (--budget, 450 s),
and a step gets its own limit or, if earlier steps ran long, what the budget
has left after the minimum kept for each later step, whichever is smaller.

It needs the Python that has torch (PYTHON, else the interpreter running this
script: dev.sh passes python3), nvcc, ninja and compute-sanitizer; no venv and
no installs (the GPU machine is offline). This file uses the standard library
only (Python 3.10+): it runs where nothing else is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "gpu-check-results"
SCHEMA_VERSION = 1
#: Seconds for the whole run; 8 minutes less room for the summary and the last step's grace period.
DEFAULT_BUDGET_S = 450
#: After a step's limit it gets SIGINT (pytest then still writes its junit XML); this long after, SIGKILL.
GRACE_S = 10
TIMEOUT_CODES = (124, 137)  # GNU timeout: the limit was reached (SIGINT honoured / SIGKILL needed)
SANITIZER_ERROR_EXIT = 99  # compute-sanitizer's exit code when it found errors

#: Tests that take a GPU branch without carrying the `cuda` marker; `-k cuda` selects the marked
#: ones (a marker is a keyword) and the tests named after CUDA (the CUDA allocator's among them).
UNMARKED_GPU_TESTS = ["test_parameters_on_another_device_are_rejected", "test_tensors_on_different_devices_are_rejected"]
PYTEST_SELECT = " or ".join(["cuda", *UNMARKED_GPU_TESTS])

#: Under memcheck: norm forward/backward on odd rows (vector body + scalar tails), empty inputs,
#: strided inputs; optimizers across several launches and in half precision; clipping.
MEMCHECK_TESTS = [
    "tests/test_norm.py::test_forward_matches_reference[b2-n5125-wb-add_layer_norm-bf16-cuda]",
    "tests/test_norm.py::test_backward_matches_reference[b2-n5125-wb-layer_norm-fp16-cuda]",
    "tests/test_norm.py::test_backward_matches_reference[b13-n769-w-add_rms_norm-fp32-cuda]",
    "tests/test_norm.py::test_forward_matches_reference[b0x3-n16-wb-rms_norm-fp32-cuda]",
    "tests/test_norm.py::test_backward_matches_reference[b4-n0-wb-add_layer_norm-fp32-cuda]",
    "tests/test_ops.py::test_matches_reference[add_layer_norm-bf16-cuda]",
    "tests/test_norm.py::test_rms_norm_matches_hf_modules_to_one_ulp[769-llama-bf16-cuda]",
    "tests/test_norm.py::test_rms_norm_modes_gradients_match_hf[gemma-cuda]",
    # warp per row (<= 256 columns) on real rows; the weight/bias gradient's second stage (many rows);
    # the scalar fallback when pointers differ in misalignment
    "tests/test_norm.py::test_forward_matches_reference[b4-n6x7-wb-add_layer_norm-fp16-cuda]",
    "tests/test_norm.py::test_backward_matches_reference[b2x3-n3x5x7-b-layer_norm-fp32-cuda]",
    "tests/test_norm.py::test_backward_matches_reference[b1000-n96-wb-add_rms_norm-bf16-cuda]",
    "tests/test_norm.py::test_inputs_at_storage_offsets[1elem-257-add_layer_norm-fp16-cuda]",
    "tests/test_optim.py::test_adamw_large_and_misaligned_tensors[True-cuda]",
    "tests/test_optim.py::test_cuda_many_tensors_span_several_launches",
    "tests/test_optim.py::test_adam_trajectory_half[AdamW-ams-max-wd0.0-lrT-bf16-cuda]",
    "tests/test_optim.py::test_sgd_trajectory_half[m0.9-d0.0-nest-wd0.1-max-lrT-fp16-cuda]",
    "tests/test_clip_grad.py::test_matches_torch[clips-2.0-bf16-cuda]",
    # the issue-9 families, every registered sample (odd sizes, empty, strided views) forward and backward
    "tests/test_ops.py::test_matches_reference[silu_mul_packed-bf16-cuda]",
    "tests/test_ops.py::test_matches_reference[gelu_mul-fp16-cuda]",
    "tests/test_ops.py::test_matches_reference[apply_rotary_pos_emb-bf16-cuda]",
    "tests/test_ops.py::test_matches_reference[apply_rotary_pos_emb-partial-fp32-cuda]",
    "tests/test_ops.py::test_matches_reference[apply_rotary_pos_emb-interleaved-fp16-cuda]",
    "tests/test_ops.py::test_matches_reference[cross_entropy-bf16-cuda]",
    "tests/test_ops.py::test_matches_reference[linear_cross_entropy-fp32-cuda]",
    "tests/test_ops.py::test_matches_reference[cross_entropy_loss_grad_-fp32-cuda]",
]
#: Under racecheck (shared-memory hazards), checking only torch_wsl's kernels (their mangled names hold the
#: namespace): the norm backward's weight/bias-gradient reduction (and the row reductions of the forward
#: it runs first), the total norm's block reductions (sum and max) of clip_grad_norm_.
RACECHECK_TESTS = [
    "tests/test_norm.py::test_backward_matches_reference[b3-n8192-wb-layer_norm-fp32-cuda]",
    "tests/test_norm.py::test_backward_matches_reference[b13-n769-w-add_rms_norm-bf16-cuda]",
    "tests/test_norm.py::test_backward_matches_reference[b1000-n96-wb-layer_norm-fp32-cuda]",
    "tests/test_clip_grad.py::test_matches_torch[clips-2.0-fp32-cuda]",
    "tests/test_clip_grad.py::test_matches_torch[no-clip-inf-bf16-cuda]",
    # cross-entropy's per-row block reductions (online max / sum-exp) and the weighted-mean sums
    "tests/test_ops.py::test_matches_reference[cross_entropy-fp32-cuda]",
    "tests/test_cross_entropy.py::test_label_smoothing_weights_ignore_match_torch[True-0.1-mean-cuda]",
]
#: The norm and optimizer suites (the alloc suite measures CPU only); no torch.compile contender,
#: whose cold compiles of every case would not fit the time budget (--bench-args to change).
DEFAULT_BENCH_ARGS = ["--quick", "--suite", "norm,optim", "--no-compile"]


@dataclass
class Step:
    name: str
    title: str
    argv: list
    limit_s: int  # its own limit
    reserve_s: int  # kept for it when earlier steps run long
    env: dict = field(default_factory=dict)  # shown in the dry run, added to the environment
    junit: Optional[str] = None  # path of its junit XML
    sanitizer_log: Optional[str] = None  # path of compute-sanitizer's log
    stdout_to: Optional[str] = None  # path of the file that gets stdout alone (the log gets stderr)

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv) + (f" > {self.stdout_to}" if self.stdout_to else "")


@dataclass
class StepResult:
    name: str
    title: str
    command: str
    limit_s: float
    effective_limit_s: Optional[float]
    status: str  # passed, failed, timed out, not run
    exit_code: Optional[int] = None
    wall_s: Optional[float] = None
    log: Optional[str] = None
    tests: Optional[dict] = None  # from the junit XML
    sanitizer: Optional[dict] = None  # from the sanitizer's log
    note: str = ""
    tail: list = field(default_factory=list)  # the log's last lines when the step did not pass


# ------------------------------------------------------------------ the GPU


def query_gpus(nvidia_smi: str) -> tuple[list[dict], str]:
    """GPUs as nvidia-smi lists them, and why none were found (empty when some were)."""
    fields = ["name", "compute_cap", "driver_version", "memory.total"]
    try:
        out = subprocess.run(
            [nvidia_smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
    except FileNotFoundError:
        return [], f"{nvidia_smi} not found"
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"{nvidia_smi} did not run: {e}"
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        return [], f"{nvidia_smi} failed (exit {out.returncode}): {msg[0] if msg else 'no output'}"
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == len(fields) and re.fullmatch(r"\d+\.\d+", parts[1]):
            gpus.append(dict(zip(["name", "compute_cap", "driver", "memory"], parts)))
    return gpus, "" if gpus else f"{nvidia_smi} listed no GPU"


def arch_list(gpus: list[dict]) -> str:
    """TORCH_CUDA_ARCH_LIST for these GPUs only, e.g. "9.0"."""
    return ";".join(sorted({g["compute_cap"] for g in gpus}, key=lambda c: tuple(int(v) for v in c.split("."))))


def find_sanitizer() -> str:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.insert(0, str(Path(nvcc).resolve().parent.parent))
    for home in filter(None, homes):
        for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
            if (Path(home) / rel).exists():
                return str(Path(home) / rel)
    return "compute-sanitizer"  # not found: the sanitizer steps fail and say so


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


# ------------------------------------------------------------------ the plan


def plan(out: Path, python: str, arch: str, jobs: int, sanitizer: str, nvidia_smi: str = "nvidia-smi",
         bench_args: Optional[list] = None) -> list[Step]:
    """Every step, in order. Paths under OUT_DIR are absolute; commands run in the repository root."""
    o = lambda name: str(out / name)  # noqa: E731
    pytest = [python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]  # skip reasons: in the junit XML
    sanitize = [sanitizer, "--launch-timeout", "0", "--report-api-errors", "no",
                "--error-exitcode", str(SANITIZER_ERROR_EXIT)]
    bench = [python, "-m", "benchmarks", "--device", "cuda", *(DEFAULT_BENCH_ARGS if bench_args is None else bench_args),
             "--out", o("benchmarks.json")]
    return [
        Step("nvidia-smi", "GPU, driver and memory", [nvidia_smi], 15, 5),
        Step("build", f"build torch_wsl._C in place for sm {arch} only", [python, "setup.py", "build_ext", "--inplace"],
             210, 60, env={"TORCH_CUDA_ARCH_LIST": arch, "FORCE_CUDA": "1", "TORCH_WSL_CPU_ONLY": "0",
                           "MAX_JOBS": str(jobs)}),
        Step("info", "torch, its GPU and torch_wsl.build_info()", [python, "tools/gpu_check.py", "--print-info"], 30, 10,
             stdout_to=o("info.json")),
        Step("pytest-cuda", "every CUDA test", [*pytest, "tests", "-k", PYTEST_SELECT, "--junitxml", o("pytest-cuda.xml")],
             150, 45, junit=o("pytest-cuda.xml")),
        Step("memcheck", "a few CUDA tests under compute-sanitizer memcheck (no caching allocator)",
             [*sanitize, "--tool", "memcheck", "--log-file", o("memcheck.sanitizer.log"),
              *pytest, "--junitxml", o("memcheck.xml"), *MEMCHECK_TESTS],
             90, 30, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, junit=o("memcheck.xml"),
             sanitizer_log=o("memcheck.sanitizer.log")),
        Step("racecheck", "the reduction kernels' tests under compute-sanitizer racecheck (torch_wsl's kernels)",
             [*sanitize, "--tool", "racecheck", "--kernel-name", "kns=torch_wsl",
              "--log-file", o("racecheck.sanitizer.log"),
              *pytest, "--junitxml", o("racecheck.xml"), *RACECHECK_TESTS],
             90, 30, junit=o("racecheck.xml"), sanitizer_log=o("racecheck.sanitizer.log")),
        Step("benchmarks", "benchmark harness on the GPU", bench, 120, 30),
        Step("bench-report", "the benchmark table as markdown", [python, "-m", "benchmarks.report", o("benchmarks.json")],
             20, 5, stdout_to=o("benchmarks.md")),
    ]


def effective_limit(steps: list[Step], i: int, remaining_s: float) -> float:
    """Step i's own limit, or what the budget leaves after the later steps' reserves, whichever is smaller."""
    later = sum(s.reserve_s for s in steps[i + 1:])
    return max(1.0, min(float(steps[i].limit_s), max(float(steps[i].reserve_s), remaining_s - later), remaining_s))


def print_dry_run(steps: list[Step], out: Path, python: str, gpus: list[dict], why_none: str, budget_s: int) -> None:
    print("gpu-check dry run: nothing is run.")
    print(f"OUT_DIR: {out}")
    print(f"python: {python}")
    if gpus:
        print("GPU: " + "; ".join(f"{g['name']} (compute capability {g['compute_cap']})" for g in gpus))
    else:
        print(f"GPU: none ({why_none}); a real run would write a summary saying so and exit 1")
    print(f"time: {budget_s} s for the whole run; each step at most its own limit, and no more than the budget "
          f"leaves after the minimum kept for each later step; SIGINT at the limit, SIGKILL {GRACE_S} s later")
    print(f"each step runs in {ROOT} with PYTHONPATH={ROOT}; a failed or timed-out step does not stop the others")
    for i, s in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {s.name}: {s.title} (limit {s.limit_s} s, at least {s.reserve_s} s kept)")
        print(f"    {s.shell()}")
    print(f"then: {out / 'summary.json'} and {out / 'summary.md'} (logs in {out / 'logs'})")


# ------------------------------------------------------------------ running


def _tail(path: Path, n: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _wait(argv: list, env: dict, stdout, stderr, hard_limit_s: float) -> int:
    """Runs argv in the repository root; on Ctrl-C passes SIGINT on (timeout hands it to the whole step) and re-raises."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=hard_limit_s)
    except subprocess.TimeoutExpired:  # only without coreutils' timeout, or if it hung itself
        proc.kill()
        proc.wait()
        return 137
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=GRACE_S + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def run_step(step: Step, out: Path, limit_s: float, env: dict) -> StepResult:
    log = out / "logs" / f"{step.name}.log"
    res = StepResult(step.name, step.title, step.shell(), step.limit_s, round(limit_s), "failed",
                     log=str(log.relative_to(out)))
    for name in (step.junit, step.sanitizer_log, step.stdout_to):
        if name:
            Path(name).unlink(missing_ok=True)  # never read a previous run's results
    wrapped = list(step.argv)
    if shutil.which("timeout"):
        wrapped = ["timeout", "-s", "INT", "-k", str(GRACE_S), str(round(limit_s)), *wrapped]
    hard_limit = limit_s + 2 * GRACE_S + 5
    t0 = time.monotonic()
    with open(log, "w") as logf:
        try:
            if step.stdout_to:
                with open(step.stdout_to, "w") as outf:
                    res.exit_code = _wait(wrapped, {**env, **step.env}, outf, logf, hard_limit)
            else:
                res.exit_code = _wait(wrapped, {**env, **step.env}, logf, subprocess.STDOUT, hard_limit)
        except FileNotFoundError as e:
            res.exit_code, res.note = 127, f"not found: {e.filename}"
            logf.write(res.note + "\n")
    res.wall_s = round(time.monotonic() - t0, 1)
    if res.exit_code == 0:
        res.status = "passed"
    elif res.exit_code in TIMEOUT_CODES:
        res.status, res.note = "timed out", res.note or f"stopped at its limit of {round(limit_s)} s"
    if step.junit:
        res.tests = parse_junit(Path(step.junit))
        if res.status == "passed" and res.tests["found"] and res.tests["passed"] == 0:
            # e.g. a build without CUDA kernels: every CUDA test skips, and nothing was checked
            res.status, res.note = "failed", f"no test passed ({res.tests['skipped']} skipped)"
    if step.sanitizer_log:
        res.sanitizer = parse_sanitizer(Path(step.sanitizer_log))
        if res.sanitizer["errors"] and res.status == "passed":
            res.status = "failed"
        if res.exit_code == SANITIZER_ERROR_EXIT and not res.note:
            res.note = "compute-sanitizer found errors"
    if res.status != "passed":
        res.tail = _tail(log)
    return res


def _describe(r: StepResult) -> str:
    parts = [f"exit {r.exit_code}", f"limit {r.effective_limit_s} s"]
    if r.tests:
        t = r.tests
        parts.append(f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
                     + (f", {t['interrupted']} interrupted" if t.get("interrupted") else "")
                     if t.get("found") else "no junit XML")
    if r.sanitizer:
        parts.append("; ".join(r.sanitizer["summaries"]) or "no sanitizer summary")
    if r.note:
        parts.append(r.note)
    return ", ".join(parts)


def run_all(steps: list[Step], out: Path, budget_s: float) -> tuple[list[StepResult], bool]:
    """Every step in order, whatever the earlier ones did; (results, interrupted by Ctrl-C)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    start = time.monotonic()
    results: list[StepResult] = []
    for i, step in enumerate(steps):
        remaining = budget_s - (time.monotonic() - start)
        if remaining < 5:
            results.append(StepResult(step.name, step.title, step.shell(), step.limit_s, None, "not run",
                                      note="the run's time budget was spent"))
            print(f"==> [{i + 1}/{len(steps)}] {step.name}: not run (time budget spent)", flush=True)
            continue
        limit = effective_limit(steps, i, remaining)
        print(f"==> [{i + 1}/{len(steps)}] {step.name} (limit {round(limit)} s): {step.shell()}", flush=True)
        try:
            r = run_step(step, out, limit, env)
        except KeyboardInterrupt:
            for s in steps[i:]:
                results.append(StepResult(s.name, s.title, s.shell(), s.limit_s, None, "not run", note="interrupted"))
            print("\ngpu-check: interrupted", flush=True)
            return results, True
        results.append(r)
        print(f"    {step.name}: {r.status} in {r.wall_s:.1f} s ({_describe(r)})", flush=True)
        for line in r.tail[-12:]:
            print(f"    | {line}", flush=True)
    return results, False


# ------------------------------------------------------------------ parsing


def _nodeid(classname: str, name: str) -> str:
    """pytest's node id from junit's classname (dotted module path, then classes) and name."""
    parts = classname.split(".") if classname else []
    for k in range(len(parts), 0, -1):
        if (ROOT / Path(*parts[:k])).with_suffix(".py").exists():
            return "::".join(["/".join(parts[:k]) + ".py", *parts[k:], name])
    return "::".join([p for p in (classname, name) if p])


def _first_lines(text: str, n: int = 3, width: int = 300) -> str:
    """The first n lines, and the last exception line below them (a subprocess's traceback ends with the cause)."""
    lines = [ln.rstrip()[:width] for ln in (text or "").strip().splitlines() if ln.strip()]
    head = lines[:n]
    cause = [ln.strip() for ln in lines[n:] if re.match(r"\s*[\w.]+(Error|Exception|Interrupt|Exit)\b:", ln)]
    return "\n".join(head + ([cause[-1]] if cause else []))


def parse_junit(path: Path) -> dict:
    """Counts and failures from pytest's junit XML (each testcase counted once: failure > error > skipped > passed)."""
    counts = {"found": False, "total": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "interrupted": 0,
              "failures": []}
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        counts["note"] = "no junit XML (the run did not get far enough to write it)"
        return counts
    except ET.ParseError as e:
        counts["note"] = f"unreadable junit XML: {e}"
        return counts
    counts["found"] = True
    for case in root.iter("testcase"):
        if not case.get("name"):  # the test running when SIGINT stopped pytest: an empty <testcase/>
            counts["interrupted"] += 1
            continue
        counts["total"] += 1
        kinds = {child.tag: child for child in case if child.tag in ("failure", "error", "skipped")}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            counts["failed" if tag == "failure" else "errors"] += 1
            el = kinds[tag]
            counts["failures"].append({
                "name": _nodeid(case.get("classname", ""), case.get("name", "")),
                "kind": tag,
                "message": _first_lines(el.get("message") or el.text or ""),
            })
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


_SAN_PREFIX = "========="
_SAN_INFO = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY", "Target application returned",
             "Warning: Could not", "This can happen", "Error: process didn't terminate")


def parse_sanitizer(path: Path, max_findings: int = 5, max_lines: int = 8) -> dict:
    """The summary lines of compute-sanitizer's log, the error count, and the first findings (a few lines each)."""
    result = {"found": False, "errors": 0, "warnings": 0, "summaries": [], "findings": [], "findings_total": 0}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        result["note"] = "no sanitizer log (compute-sanitizer did not start or was stopped early)"
        return result
    result["found"] = True
    error_summary, race_errors = None, 0
    current: Optional[list] = None
    for line in text.splitlines():
        if not line.startswith(_SAN_PREFIX):
            continue
        body = line[len(_SAN_PREFIX):]
        content = body.strip()
        m = re.match(r"ERROR SUMMARY: (\d+) error", content)
        if m:
            error_summary = (error_summary or 0) + int(m.group(1))
        m = re.match(r"RACECHECK SUMMARY: .*\((\d+) errors?, (\d+) warnings?\)", content)
        if m:
            race_errors += int(m.group(1))
            result["warnings"] += int(m.group(2))
        if content.startswith(("ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY")):
            result["summaries"].append(content)
        if not content:
            current = None
        elif body.startswith("  ") and current is not None:  # an indented continuation of a finding
            if len(current) < max_lines:
                current.append(content)
        elif not body.startswith("  ") and not content.startswith(_SAN_INFO):
            result["findings_total"] += 1
            current = [content]
            if len(result["findings"]) < max_findings:
                result["findings"].append(current)
            else:
                current = None
    result["findings"] = ["\n".join(f) for f in result["findings"]]
    result["errors"] = error_summary if error_summary is not None else race_errors
    return result


# ------------------------------------------------------------------ the summary


def _read_json(path: Path):
    """The file as JSON, else its last line as JSON (a step's stdout may hold more), else None."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    for candidate in (text, text.splitlines()[-1] if text else ""):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def _read_text(path: Path, limit: int = 20000) -> Optional[str]:
    try:
        return path.read_text(errors="replace")[:limit]
    except OSError:
        return None


def build_summary(results: list[StepResult], out: Path, gpus: list[dict], why_none: str = "", wall_s: float = 0.0,
                  budget_s: float = DEFAULT_BUDGET_S, python: str = "", extra: Optional[dict] = None) -> dict:
    """The summary as a JSON-able dict: per step, and what the steps left in OUT_DIR."""
    failed = [r.name for r in results if r.status != "passed"]
    if not gpus:
        status = "no GPU"
    else:
        status = "passed" if not failed else "failed"
    info = _read_json(out / "info.json") or {}
    summary = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": status,
        "ok": status == "passed",
        "message": (f"no NVIDIA GPU found ({why_none}): nothing was run" if not gpus else
                    f"{len(failed)} of {len(results)} steps did not pass: {', '.join(failed)}" if failed else
                    f"all {len(results)} steps passed"),
        "out_dir": str(out),
        "python": python,
        "wall_s": round(wall_s, 1),
        "budget_s": budget_s,
        "gpus": gpus,
        "gpu_name": info.get("gpu") or (gpus[0]["name"] if gpus else None),
        "torch": info.get("torch"),
        "torch_cuda": info.get("torch_cuda"),
        "build_info": info.get("torch_wsl"),
        "nvidia_smi": _read_text(out / "logs" / "nvidia-smi.log"),
        "steps": [asdict(r) for r in results],
        "benchmarks": None,
        "benchmarks_markdown": None,
    }
    if any(r.name == "benchmarks" and r.status != "not run" for r in results):
        summary["benchmarks"] = _read_json(out / "benchmarks.json")
    if any(r.name == "bench-report" and r.status == "passed" for r in results):
        summary["benchmarks_markdown"] = _read_text(out / "benchmarks.md")
    summary.update(extra or {})
    return summary


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(s: dict) -> str:
    lines = [f"# torch_wsl GPU check: {s['status'].upper()}", "", s["message"], ""]
    gpu = "; ".join(f"{g['name']} (compute capability {g['compute_cap']}, driver {g['driver']}, {g['memory']})"
                    for g in s.get("gpus") or []) or "none"
    lines.append(f"- GPU: {gpu}")
    lines.append(f"- torch: {s.get('torch') or 'unknown'} (CUDA {s.get('torch_cuda') or 'unknown'}), python {s.get('python')}")
    bi = s.get("build_info")
    lines.append(f"- torch_wsl.build_info(): `{json.dumps(bi)}`" if bi is not None else "- torch_wsl.build_info(): unknown")
    lines.append(f"- wall time {s.get('wall_s')} s (budget {s.get('budget_s')} s); created {s.get('created')}")
    lines += ["", "| # | step | status | exit | wall s | limit s | tests: pass / fail / error / skip | sanitizer |",
              "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(s["steps"], 1):
        t = r.get("tests")
        tests = ("" if not t else f"{t['passed']} / {t['failed']} / {t['errors']} / {t['skipped']}"
                 + (f" ({t['interrupted']} interrupted)" if t.get("interrupted") else "") if t.get("found")
                 else "no junit XML")
        san = r.get("sanitizer")
        san_cell = "" if not san else ("; ".join(san["summaries"]) or "no summary")
        wall = "" if r.get("wall_s") is None else f"{r['wall_s']:.1f}"
        limit = r.get("effective_limit_s") if r.get("effective_limit_s") is not None else r.get("limit_s")
        status = r["status"] + (f" ({r['note']})" if r["status"] == "not run" and r.get("note") else "")
        lines.append(f"| {i} | {r['name']} | {_cell(status)} | {'' if r.get('exit_code') is None else r['exit_code']} | "
                     f"{wall} | {limit} | {_cell(tests)} | {_cell(san_cell)} |")
    bad = [r for r in s["steps"] if r["status"] in ("failed", "timed out")]
    if bad:
        lines += ["", "## Steps that did not pass"]
        for r in bad:
            lines += ["", f"### {r['name']}: {r['status']}" + (f" ({r['note']})" if r.get("note") else ""), "",
                      f"`{r['command']}`"]
            t = r.get("tests") or {}
            for f in t.get("failures", [])[:30]:
                msg = f["message"].replace("\n", " / ")
                lines.append(f"- `{f['name']}` ({f['kind']}): {msg}")
            if len(t.get("failures", [])) > 30:
                lines.append(f"- ... and {len(t['failures']) - 30} more (see the junit XML)")
            if r.get("tail"):
                lines += ["", f"Last lines of {r.get('log')}:", "", "```", *r["tail"], "```"]
    sans = [r for r in s["steps"] if r.get("sanitizer")]
    if sans:
        lines += ["", "## Sanitizer findings"]
        for r in sans:
            san = r["sanitizer"]
            lines += ["", f"### {r['name']}", ""]
            lines += [f"- {x}" for x in san["summaries"]] or [f"- {san.get('note') or 'no summary line in the log'}"]
            if san["findings"]:
                lines += ["", f"First findings ({len(san['findings'])} of {san['findings_total']}):", "", "```"]
                for f in san["findings"]:
                    lines += [f, ""]
                lines[-1] = "```"
    if s.get("benchmarks_markdown"):
        lines += ["", "## Benchmarks", "", s["benchmarks_markdown"].strip()]
    if s.get("nvidia_smi"):
        lines += ["", "## nvidia-smi", "", "```", s["nvidia_smi"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "summary.json", out / "summary.md"
    js.write_text(json.dumps(summary, indent=2) + "\n")
    md.write_text(render_markdown(summary))
    return js, md


# ------------------------------------------------------------------ torch side (runs under the torch Python)


def print_info() -> int:
    """One JSON line: torch, its CUDA and GPU, torch_wsl.build_info(). Exit 1 unless all of them are usable."""
    sys.path.insert(0, str(ROOT))
    info: dict = {}
    ok = True
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                    device_count=torch.cuda.device_count())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
        else:
            ok = False
            print("torch sees no CUDA device", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 (reported, not raised)
        info["torch"] = None
        info["error"] = f"import torch failed: {e}"
        print(info["error"], file=sys.stderr)
        ok = False
    try:
        import torch_wsl

        info["torch_wsl"] = torch_wsl.build_info()
        if not info["torch_wsl"].get("cuda_kernels"):
            ok = False
            print("torch_wsl was built without CUDA kernels", file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        info["torch_wsl"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"import torch_wsl failed: {e}", file=sys.stderr)
        ok = False
    print(json.dumps(info))
    return 0 if ok else 1


# ------------------------------------------------------------------ main


def parse_args(argv: list) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="./dev.sh gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", type=Path, default=DEFAULT_OUT, help=f"results (default {DEFAULT_OUT})")
    p.add_argument("--dry-run", action="store_true", help="print the steps, their commands and limits; run nothing")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    p.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable,
                   help="the Python that has torch (default: $PYTHON, else this interpreter)")
    p.add_argument("--nvidia-smi", default="nvidia-smi", help="nvidia-smi to ask for the GPUs")
    p.add_argument("--bench-args", type=shlex.split, default=None,
                   help=f"harness arguments after --device cuda (default: {shlex.join(DEFAULT_BENCH_ARGS)})")
    p.add_argument("--print-info", action="store_true", help=argparse.SUPPRESS)  # the info step
    return p.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.print_info:
        return print_info()
    out = args.out_dir.resolve()
    gpus, why_none = query_gpus(args.nvidia_smi)
    arch = arch_list(gpus) or "<compute_cap from nvidia-smi>"
    steps = plan(out, args.python, arch, cpu_count(), find_sanitizer(), args.nvidia_smi, args.bench_args)
    if args.dry_run:
        print_dry_run(steps, out, args.python, gpus, why_none, args.budget)
        return 0
    if not gpus:
        results = [StepResult(s.name, s.title, s.shell(), s.limit_s, None, "not run", note="no GPU") for s in steps]
        summary = build_summary(results, out, gpus, why_none, python=args.python, budget_s=args.budget)
        js, md = write_summary(out, summary)
        print(f"gpu-check: no NVIDIA GPU found ({why_none}); nothing was run. This command needs a machine with an "
              f"NVIDIA GPU and its driver; `./dev.sh gpu-check --dry-run` lists the steps. Summary: {md}", file=sys.stderr)
        return 1
    # A step is stopped with SIGINT (pytest then still writes its junit XML); a Python started with
    # SIGINT ignored (a background job of a non-interactive shell) would ignore it, and so would its children.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"gpu-check: {', '.join(g['name'] for g in gpus)}; TORCH_CUDA_ARCH_LIST={arch}; MAX_JOBS={cpu_count()}; "
          f"python {args.python}; OUT_DIR {out}; budget {args.budget} s", flush=True)
    t0 = time.monotonic()
    results, interrupted = run_all(steps, out, args.budget)
    summary = build_summary(results, out, gpus, wall_s=time.monotonic() - t0, budget_s=args.budget, python=args.python)
    if interrupted:
        summary.update(status="interrupted", ok=False, message="interrupted (Ctrl-C); " + summary["message"])
    js, md = write_summary(out, summary)
    print(f"\ngpu-check: {summary['status']}: {summary['message']} ({summary['wall_s']:.0f} s)")
    print(f"summary: {md} and {js}")
    return 130 if interrupted else 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
