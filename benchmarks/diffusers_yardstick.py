"""diffusers' own scheduler tests, run with the class under test taken from pygen.diffusion.

The yardstick of issue 13: each of diffusers' ``tests/schedulers/test_scheduler_<name>.py``
files for a scheduler pygen has is run with pytest, with only the class under test swapped
for pygen's class of the same name (``diffusers.<Name>`` is replaced before the test module
is imported, so the module's ``from diffusers import <Name>`` picks up pygen's class; every
other diffusers class the file uses, e.g. the ``DEISMultistepScheduler`` of a ``test_switch``
round trip, stays diffusers'). Each file runs in its own process, so one file's swap cannot
leak into another's. Prints per-file pass / fail / skip counts and a total; ``--json`` also
writes them, with every failing test and its one-line reason, to a file.

How to run (no GPU needed; ~30 s on 2 threads)::

    # 1. diffusers' test files, outside this repository (their code stays theirs): any
    #    checkout of https://github.com/huggingface/diffusers, v0.40-0.42, or just its
    #    tests/__init__.py, tests/testing_utils.py, tests/others/{__init__,test_utils}.py
    #    and tests/schedulers/ extracted with `git archive v0.40.0 tests/... | tar -x -C DIR`.
    # 2. with an environment that has pygen and diffusers installed (the tests import diffusers):
    python benchmarks/diffusers_yardstick.py /path/to/diffusers/tests
    python benchmarks/diffusers_yardstick.py /path/to/diffusers/tests --json out.json
    python benchmarks/diffusers_yardstick.py /path/to/diffusers/tests --only ddpm unipc -v
    python benchmarks/diffusers_yardstick.py /path/to/diffusers/tests --stock   # no swap: diffusers itself

Options: ``--only`` runs a subset of the files (keys below), ``--stock`` runs the files
unswapped (diffusers' own result in the same environment, the reference), ``-v`` prints
each failing test's reason, ``--pytest-args`` passes more arguments to pytest (e.g. ``-k``).

diffusers' ``tests/conftest.py`` is not loaded (``--noconftest``): it puts the checkout's
``src/`` ahead of the installed diffusers, and the yardstick is the installed one; its
FutureWarning filter is applied here instead.

Tests known to fail by design are listed in ``BY_DESIGN`` with the reason (pygen draws its
stochastic steps' noise from its counter-based Philox stream, not from ``torch.randn``, so a
test pinning the sum of a sampled trajectory drawn from ``torch.manual_seed`` cannot match);
they are counted separately (``by_design``) and the run's exit status is 0 when every other
test passes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# diffusers test file (tests/schedulers/test_scheduler_<key>.py) -> the class under test.
# FlowMatchEulerDiscreteScheduler has no test file in diffusers' tests/schedulers (v0.40).
FILES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpm_multi": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "lcm": "LCMScheduler",
    "unipc": "UniPCMultistepScheduler",
}

# test id (file key, "Class::test") -> why it fails by design.
RANDN = (
    "pins the sum/mean of a sampled trajectory whose noise diffusers draws with torch.randn "
    "under torch.manual_seed; pygen draws it from its counter-based Philox stream by design "
    "(pass noise=/variance_noise= to reproduce diffusers' draws, which pygen's own parity "
    "tests do)"
)
BY_DESIGN: dict[tuple[str, str], str] = {
    ("ddpm", "DDPMSchedulerTest::test_full_loop_no_noise"): RANDN,  # (it does draw: t > 0 steps add noise)
    ("ddpm", "DDPMSchedulerTest::test_full_loop_with_noise"): RANDN,
    ("ddpm", "DDPMSchedulerTest::test_full_loop_with_v_prediction"): RANDN,
    ("euler_ancestral", "EulerAncestralDiscreteSchedulerTest::test_full_loop_no_noise"): RANDN,
    ("euler_ancestral", "EulerAncestralDiscreteSchedulerTest::test_full_loop_with_noise"): RANDN,
    ("euler_ancestral", "EulerAncestralDiscreteSchedulerTest::test_full_loop_with_v_prediction"): RANDN,
    ("euler_ancestral", "EulerAncestralDiscreteSchedulerTest::test_full_loop_device"): RANDN,
    ("lcm", "LCMSchedulerTest::test_full_loop_multistep"): RANDN,  # LCM re-noises between its steps
}

# the class under test -> whether its step draws noise (for --diffusers-noise: diffusers draws
# model_output.shape from torch.randn with the step's generator, where pygen draws Philox)
STOCHASTIC = {"DDPMScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler"}


def _diffusers_noise(cls) -> None:
    """--diffusers-noise: make the stochastic step of pygen's ``cls`` take diffusers' draws
    (``torch.randn(shape, generator=generator)`` per step, as diffusers' ``randn_tensor`` on CPU)
    through its ``noise=`` argument. Checks that the BY_DESIGN tests fail by the draws alone."""
    import functools
    import inspect

    import torch

    step = cls.step
    gen_pos = list(inspect.signature(step).parameters).index("generator") if "generator" in inspect.signature(step).parameters else None

    @functools.wraps(step)  # keeps step's signature: the tests look for its generator parameter
    def step_with_torch_randn(self, model_output, timestep, sample, *args, **kw):
        if kw.get("noise") is None and kw.get("variance_noise") is None:
            g = kw.get("generator")
            if g is None and gen_pos is not None and len(args) > gen_pos - 4:
                g = args[gen_pos - 4]
            kw["noise"] = torch.randn(model_output.shape, generator=g, dtype=model_output.dtype).to(model_output.device)
        return step(self, model_output, timestep, sample, *args, **kw)

    cls.step = step_with_torch_randn


def _swap(name: str) -> None:
    """Replace diffusers.<name> (and its re-export in diffusers.schedulers) by pygen's class."""
    import diffusers
    import diffusers.schedulers

    import pygen.diffusion as P

    cls = getattr(P, name)
    getattr(diffusers, name)  # resolve the lazy attribute first, so the swap is not undone
    setattr(diffusers, name, cls)
    getattr(diffusers.schedulers, name)
    setattr(diffusers.schedulers, name, cls)


class _Collect:
    """pytest plugin: outcome of every test (call phase, or the setup failure)."""

    def __init__(self):
        self.results: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        nodeid = report.nodeid.split("::", 1)[1] if "::" in report.nodeid else report.nodeid
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            outcome = report.outcome
            reason = ""
            if report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                reason = crash.message.splitlines()[0] if crash is not None else str(report.longrepr).splitlines()[-1]
                if report.when == "setup":
                    outcome = "error"
            elif report.skipped:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            self.results[nodeid] = {"outcome": outcome, "reason": reason[:300]}


def _run_one(tests_dir: str, key: str, stock: bool, extra: list[str], diffusers_noise: bool = False) -> dict:
    """In this process: swap, run one file, return its per-test results."""
    import pytest

    warnings.simplefilter(action="ignore", category=FutureWarning)
    if not stock:
        _swap(FILES[key])
        if diffusers_noise and FILES[key] in STOCHASTIC:
            import pygen.diffusion as P

            _diffusers_noise(getattr(P, FILES[key]))
    path = os.path.join(tests_dir, "schedulers", f"test_scheduler_{key}.py")
    collect = _Collect()
    args = [path, "-q", "-p", "no:cacheprovider", "--noconftest", "-W", "ignore", "--no-header",
            "--rootdir", os.path.dirname(tests_dir), *extra]
    with open(os.devnull, "w") as devnull:
        old = sys.stdout
        sys.stdout = devnull
        try:
            rc = pytest.main(args, plugins=[collect])
        finally:
            sys.stdout = old
    return {"rc": int(rc), "tests": collect.results}


def _summarise(key: str, res: dict) -> dict:
    tests = res["tests"]
    out = {"class": FILES[key], "passed": 0, "failed": 0, "by_design": 0, "skipped": 0, "error": 0,
           "failures": {}, "by_design_failures": {}}
    for tid, r in sorted(tests.items()):
        o = r["outcome"]
        if o in ("failed", "error"):
            why = BY_DESIGN.get((key, tid))
            if why is not None:
                out["by_design"] += 1
                out["by_design_failures"][tid] = {"reason": why, "error": r["reason"]}
                continue
            out["failures"][tid] = r["reason"]
        out[o] = out.get(o, 0) + 1
    out["total"] = len(tests)
    if not tests:
        out["collect_rc"] = res["rc"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tests_dir", help="a diffusers checkout's tests/ directory (holds schedulers/)")
    ap.add_argument("--only", nargs="+", choices=sorted(FILES), help="run only these files")
    ap.add_argument("--stock", action="store_true", help="no swap: diffusers' own classes")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each failure's reason")
    ap.add_argument("--pytest-args", default="", help="more pytest arguments (one string)")
    ap.add_argument("--diffusers-noise", action="store_true",
                    help="feed the stochastic steps diffusers' torch.randn draws (noise=): the BY_DESIGN tests must pass then")
    ap.add_argument("--_one", metavar="KEY", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    tests_dir = os.path.abspath(a.tests_dir)
    extra = a.pytest_args.split()

    if a._one:  # child process: one file
        res = _run_one(tests_dir, a._one, a.stock, extra, a.diffusers_noise)
        sys.stdout.write("\n@@YARDSTICK@@" + json.dumps(res) + "\n")
        return 0

    if not os.path.isdir(os.path.join(tests_dir, "schedulers")):
        ap.error(f"{tests_dir} has no schedulers/ directory")
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    per_file = {}
    for key in a.only or FILES:
        cmd = [sys.executable, os.path.abspath(__file__), tests_dir, "--_one", key]
        if a.stock:
            cmd.append("--stock")
        if a.diffusers_noise:
            cmd.append("--diffusers-noise")
        if extra:
            cmd += ["--pytest-args", a.pytest_args]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(tests_dir))
        marker = p.stdout.rfind("@@YARDSTICK@@")
        if marker < 0:
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
            per_file[key] = {"class": FILES[key], "crashed": True, "passed": 0, "failed": 0, "by_design": 0,
                             "skipped": 0, "error": 1, "total": 0, "failures": {"<process>": p.stderr[-300:]},
                             "by_design_failures": {}}
            continue
        per_file[key] = _summarise(key, json.loads(p.stdout[marker + len("@@YARDSTICK@@"):].strip()))

    cols = ("passed", "failed", "error", "by_design", "skipped", "total")
    total = {c: sum(f[c] for f in per_file.values()) for c in cols}
    print(f"{'file':<34}{'class':<34}" + "".join(f"{c:>10}" for c in cols))
    for key, f in per_file.items():
        print(f"{'test_scheduler_' + key + '.py':<34}{f['class']:<34}" + "".join(f"{f[c]:>10}" for c in cols))
        if a.verbose:
            for tid, why in f["failures"].items():
                print(f"    FAIL {tid}: {why}")
            for tid, d in f["by_design_failures"].items():
                print(f"    BY DESIGN {tid}: {d['error']}")
    print(f"{'total':<68}" + "".join(f"{total[c]:>10}" for c in cols))
    print(f"{total['passed']} of {total['total']} passed ({'diffusers itself' if a.stock else 'class under test from pygen.diffusion'}); "
          f"{total['by_design']} fail by design, {total['failed'] + total['error']} other failures")

    if a.json:
        import diffusers
        import torch

        doc = {
            "what": "diffusers' tests/schedulers files with the class under test from pygen.diffusion"
                    if not a.stock else "diffusers' tests/schedulers files, stock diffusers classes",
            "tests_dir": tests_dir,
            "diffusers_installed": diffusers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "total": total,
            "files": per_file,
        }
        with open(a.json, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=False)
            fh.write("\n")
    return 0 if total["failed"] + total["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
