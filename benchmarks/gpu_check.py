"""GPU correctness check, for a machine with a CUDA build of torch and nothing else.

    make gpu-check                      # PYTHON=python3, results in build/gpu-check/
    make gpu-check PYTHON=/opt/py/bin/python GPU_CHECK_OUT=/tmp/gc

Installs nothing and imports only the core (torch, numpy, psutil, nvidia-ml-py): the repo
is put on ``PYTHONPATH``. ``make gpu-check`` first runs every ``gpu``-marked test (JUnit
XML into the output folder), then this script, which reads those results and measures:

* adaptive vs a plain loop on GPU 0 (same parameters after training? samples/s);
* adaptive vs plain ``nn.DataParallel`` over every GPU (with one GPU: whether
  ``nn.DataParallel(device_ids=[0, 0])`` runs at all, and its gradient);
* uneven scatter, gather and gradient equality with 2–4 replicas (emulated on GPU 0 with a
  repeated device id; also a model returning its own loss);
* a real out-of-memory recovered in a run (the batch retried, parameters as a plain loop),
  and a real one in ``optimizer.step()`` (Adam's first step, memory filled so its state
  cannot fit; restored exactly and retried once room is made);
* the engine's per-device forward/backward timing against ``torch.profiler``'s kernel
  time, and the measured backward/forward ratio (the engine used to assume 2);
* own-memory accounting: the CUDA allocator's reserved memory against NVML's figure for
  this process;
* adaptation: three replicas on GPU 0, one slowed by an injected GPU sleep proportional to
  its chunk; its share must fall within a few control ticks.

Each result says whether it was *real* or *emulated*. Everything is sized to finish in a
few minutes (the whole target in under 8). Writes ``gpu_check.json`` and ``summary.txt``
into ``--out``; exits 1 if a check or a gpu test failed. Without CUDA it writes a "no
CUDA device: skipped" summary and exits 0.
"""

import argparse
import json
import platform
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, Path(__file__).resolve().parent):  # `make gpu-check` sets PYTHONPATH
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from gpu_check_measure import (  # noqa: E402
    check_adaptation_emulated,
    check_backward_timing_vs_profiler,
    check_own_memory,
)
from gpu_check_training import (  # noqa: E402
    Result,
    _result,
    check_adaptive_vs_dataparallel,
    check_adaptive_vs_plain_gpu0,
    check_oom_in_optimizer_step,
    check_oom_recovery_in_a_run,
    check_uneven_replicas_on_one_gpu,
)

CHECKS: list[tuple[Callable[[], Result], float]] = [  # (check, seconds it may need)
    (check_adaptive_vs_plain_gpu0, 30),
    (check_adaptive_vs_dataparallel, 30),
    (check_uneven_replicas_on_one_gpu, 20),
    (check_oom_recovery_in_a_run, 30),
    (check_oom_in_optimizer_step, 40),
    (check_backward_timing_vs_profiler, 40),
    (check_own_memory, 10),
    (check_adaptation_emulated, 60),
]

# -- driver -------------------------------------------------------------------------------


def read_junit(path: Path | None) -> dict[str, Any]:
    """Counts and failed test names from pytest's JUnit XML (None: not run)."""
    if path is None:
        return {"ran": False}
    if not path.exists():
        return {"ran": False, "note": f"{path} not found: did pytest start?"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {"ran": True, **counts, "failed": failed}


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["devices"] = [
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    return env


def summary_text(results: dict[str, Any]) -> str:
    lines = ["adaptive_nb GPU check", ""]
    env = results["environment"]
    lines.append(f"python {env['python']}, torch {env['torch']} (CUDA build {env['cuda_build']})")
    tests = results["pytest"]
    if tests.get("ran"):
        lines.append(
            f"gpu tests: {tests['tests']} collected, {tests['failures']} failed, "
            f"{tests['errors']} errors, {tests['skipped']} skipped"
        )
        lines.extend(f"  FAILED {name}" for name in tests["failed"])
    else:
        lines.append(f"gpu tests: not run ({tests.get('note', 'no --junit given')})")
    if not env["cuda_available"]:
        lines += ["", "no CUDA device: skipped (nothing measured)"]
    for check in results["checks"]:
        lines += ["", f"[{check['status'].upper()}] {check['name']} ({check['kind']})"]
        lines.append(f"  {check['what']}")
        for key, value in check.get("measured", {}).items():
            lines.append(f"  {key}: {json.dumps(value, default=str)}")
        lines.extend(f"  note: {n}" for n in check.get("notes", []))
        if "error" in check:
            lines.append(f"  error: {check['error']}")
    lines += ["", f"overall: {results['overall']}"]
    return "\n".join(lines) + "\n"


def run_checks(budget_s: float) -> list[Result]:
    t0 = time.monotonic()
    done: list[Result] = []
    for check, need_s in CHECKS:
        name = check.__name__.removeprefix("check_")
        if time.monotonic() - t0 + need_s > budget_s:
            skipped = _result(name, "-", "")
            skipped.update(status="skipped", notes=["time budget spent"])
            done.append(skipped)
            continue
        c0 = time.monotonic()
        try:
            result = check()
        except Exception as exc:
            result = _result(name, "-", check.__doc__ or "")
            result["status"] = "failed"
            result["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            result["traceback"] = traceback.format_exc()[-3000:]
        result["seconds"] = round(time.monotonic() - c0, 2)
        done.append(result)
        torch.cuda.empty_cache()
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check")
    parser.add_argument("--junit", type=Path, default=None, help="pytest's JUnit XML")
    parser.add_argument("--budget-s", type=float, default=240.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "environment": environment(),
        "pytest": read_junit(args.junit),
        "checks": [],
    }
    tests = results["pytest"]
    # given --junit, the tests must have run and passed (a killed pytest leaves no XML)
    tests_ok = (args.junit is None or tests["ran"]) and not tests.get("failed")
    tests_ok = tests_ok and not tests.get("errors")
    if torch.cuda.is_available():
        results["checks"] = run_checks(args.budget_s)
        checks_ok = all(c["status"] != "failed" for c in results["checks"])
        results["overall"] = "passed" if checks_ok and tests_ok else "FAILED"
    else:
        results["overall"] = "no CUDA device: skipped" if tests_ok else "FAILED"
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    text = summary_text(results)
    (args.out / "summary.txt").write_text(text)
    print(text, end="")
    print(f"results: {args.out / 'gpu_check.json'}, {args.out / 'summary.txt'}")
    return 0 if results["overall"] != "FAILED" else 1


if __name__ == "__main__":
    sys.exit(main())
