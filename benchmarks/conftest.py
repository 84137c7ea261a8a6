"""pytest options, parametrization, the shared benchmark driver, the session's
copy-bandwidth measurement and a bandwidth summary.

Options (each also an environment variable, handy in CI):
  --bench-quick      PYGEN_BENCH_QUICK=1        sizes 1e4 and 1e5 only (a smoke test;
                                                the diffusion suite: 16x3x64x64 only)
  --bench-sizes      PYGEN_BENCH_SIZES=1e4,1e6   the sizes (numel) to run, or the diffusion
                                                suite's shapes (256x3x64x64); each module
                                                runs those of its own sizes that are named
  --bench-providers  PYGEN_BENCH_PROVIDERS=...   subset of pygen-cpp,eager,compile
  --bench-heavy      PYGEN_BENCH_HEAVY=1        also run what a module skips as too heavy
                                                for a small machine (its skip_reason)
Rounds per benchmark follow pytest-benchmark's --benchmark-max-time (default 1 s) and
--benchmark-min-rounds (default 5); see ``run_benchmark``.

A bench_*.py module sets BENCH_OPS (default: the Gaussian ops), defines one test taking
the fixtures op, mode, size, provider (plus direction and bins for the ops that have them,
see _common.variants) and run_benchmark, and calls run_benchmark with them. Optionally
BENCH_SIZES (labels: default the numel labels of _common.CPU_SIZES; the diffusion suite's
are shapes, '256x3x64x64') and BENCH_QUICK_SIZES (default 1e4, 1e5). Each op runs in the
modes of CPU_MODES it has (_common.op_modes: sampler steps are forward only).
"""

from __future__ import annotations

import math
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _baselines, _common

from _common import CPU_SIZES as ALL_SIZES  # noqa: E402
from _common import (  # noqa: E402
    DIFFUSION_CPU_SHAPES,
    DIFFUSION_QUICK_SHAPES,
    GAUSSIAN_OPS,
    bench_shape,
    bytes_moved,
    bytes_note,
    check_grads,
    check_outputs,
    diff_outputs,
    grad_inputs,
    make_grads,
    make_inputs,
    measure_cpu_copy_bandwidth,
    op_modes,
    provider_fn,
    variant_label,
    variants,
)

QUICK_SIZES = ("1e4", "1e5")
KNOWN_SIZES = (*ALL_SIZES, *DIFFUSION_CPU_SHAPES)  # what --bench-sizes accepts (any module's)
ALL_PROVIDERS = ("pygen-cpp", "eager", "compile")
CPU_MODES = ("forward", "forward_backward")

_copy_key = pytest.StashKey[dict]()
_records_key = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("pygen-bench", "pygen benchmarks")
    group.addoption("--bench-quick", action="store_true", default=None,
                    help="only sizes 1e4 and 1e5 (env PYGEN_BENCH_QUICK=1)")
    group.addoption("--bench-sizes", default=None,
                    help=f"comma list from {','.join(KNOWN_SIZES)}; each module runs those of its own sizes "
                         "(env PYGEN_BENCH_SIZES)")
    group.addoption("--bench-providers", default=None,
                    help=f"comma list from {','.join(ALL_PROVIDERS)} (env PYGEN_BENCH_PROVIDERS)")
    group.addoption("--bench-heavy", action="store_true", default=None,
                    help="also run what a module skips as too heavy for a small machine (env PYGEN_BENCH_HEAVY=1)")


def _csv(value: str, allowed, what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise pytest.UsageError(f"{what}: {value!r}; choose from {','.join(allowed)}")
    return items


def bench_sizes(config, sizes=None, quick_sizes=QUICK_SIZES) -> tuple[str, ...]:
    """The size labels to run among ``sizes`` (default the numel labels, ALL_SIZES)."""
    sizes = tuple(sizes if sizes is not None else ALL_SIZES)
    chosen = config.getoption("--bench-sizes") or os.environ.get("PYGEN_BENCH_SIZES")
    if chosen:
        return tuple(s for s in _csv(chosen, KNOWN_SIZES, "--bench-sizes") if s in sizes)
    quick = config.getoption("--bench-quick") or os.environ.get("PYGEN_BENCH_QUICK", "") not in ("", "0")
    return tuple(quick_sizes) if quick else sizes


def size_numel(size: str) -> int:
    return math.prod(bench_shape(size))


def bench_providers(config) -> tuple[str, ...]:
    providers = config.getoption("--bench-providers") or os.environ.get("PYGEN_BENCH_PROVIDERS")
    return _csv(providers, ALL_PROVIDERS, "--bench-providers") if providers else ALL_PROVIDERS


def bench_heavy(config) -> bool:
    return bool(config.getoption("--bench-heavy")) or os.environ.get("PYGEN_BENCH_HEAVY", "") not in ("", "0")


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py when pytest walks this directory (``pytest benchmarks``).

    A file named on the command line is collected by pytest itself whatever its name, so
    only the directory walk needs this (and doing both would collect it twice).
    """
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    """Parametrize test functions taking (op, mode, size, provider); 1e7 is marked slow.

    Ops: the module's BENCH_OPS; sizes: its BENCH_SIZES / BENCH_QUICK_SIZES (bench_sizes);
    modes: those of CPU_MODES the op has (op_modes). A test that also takes ``direction`` (and ``bins``) gets
    each of an op's variants (_common.variants; ``bins`` is None for ops without it). The
    module's optional ``skip_reason(op, mode, size, provider, direction=, bins=)`` says why
    a combination is skipped (None: run it); --bench-heavy runs them all.
    IDs: ``<op>[-<direction>][-K<bins>]-<mode>-<size>-<provider>``.
    """
    if "provider" not in metafunc.fixturenames:
        return
    ops = getattr(metafunc.module, "BENCH_OPS", GAUSSIAN_OPS)
    sizes = bench_sizes(metafunc.config, getattr(metafunc.module, "BENCH_SIZES", None),
                        getattr(metafunc.module, "BENCH_QUICK_SIZES", QUICK_SIZES))
    skip_reason = None if bench_heavy(metafunc.config) else getattr(metafunc.module, "skip_reason", None)
    keys = [k for k in ("direction", "bins") if k in metafunc.fixturenames]
    params, ids = [], []
    for op in ops:
        for var in variants(op) if keys else [{}]:
            for mode in (m for m in CPU_MODES if m in op_modes(op)):
                for size in sizes:
                    for provider in bench_providers(metafunc.config):
                        marks = [pytest.mark.slow] if size_numel(size) >= 10**7 else []
                        if skip_reason and (why := skip_reason(op, mode, size, provider, **var)):
                            marks.append(pytest.mark.skip(reason=why))
                        values = [op, *(var.get(k) for k in keys), mode, size, provider]
                        params.append(pytest.param(*values, marks=marks))
                        ids.append(f"{variant_label(op, **var)}-{mode}-{size}-{provider}")
    metafunc.parametrize(",".join(["op", *keys, "mode", "size", "provider"]), params, ids=ids)


def pytest_configure(config):
    config.stash[_records_key] = []
    # Raised inside torch.compile's imports on some versions; not ours to act on.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_report_header(config):
    import torch

    import pygen

    return (f"pygen {pygen.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"backends {pygen.available_backends()}, sizes {','.join(bench_sizes(config))} "
            f"(diffusion: {','.join(bench_sizes(config, DIFFUSION_CPU_SHAPES, DIFFUSION_QUICK_SHAPES)) or '-'}), "
            f"providers {','.join(bench_providers(config))}")


@pytest.fixture(scope="session")
def copy_bandwidth(pytestconfig) -> dict:
    """Measured once per session: ``dst.copy_(src)`` of 64 MiB float32, read + write bytes."""
    bw = measure_cpu_copy_bandwidth()
    pytestconfig.stash[_copy_key] = bw
    return bw


@pytest.fixture
def bench_record(pytestconfig):
    """Append a dict (group, provider, median_s, gbps, copy_fraction) for the summary table."""
    return pytestconfig.stash[_records_key].append


MAX_ROUNDS = 100_000


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds every process has used, this process's), or None off Linux.

    Their difference over a benchmark is the CPU time other processes took meanwhile: on a
    2-core machine a compiler in the background steals a core, and a 2-thread op then waits
    for its descheduled thread (times quantised to the scheduler's ticks, several ms).
    """
    try:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:9]]  # user .. steal
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    own = os.times()
    return busy, own.user + own.system


def _rounds(target, setup, max_time: float, min_rounds: int) -> int:
    """Rounds that fill about ``max_time`` seconds (after the warm-up calls already made)."""
    best = math.inf
    for _ in range(2):
        if setup is not None:
            setup()
        t = time.perf_counter()
        target()
        best = min(best, time.perf_counter() - t)
        if best * min_rounds >= max_time:  # min_rounds whatever a second call takes: skip it
            break
    return int(min(MAX_ROUNDS, max(min_rounds, math.ceil(max_time / max(best, 1e-9)))))


@pytest.fixture
def run_benchmark(benchmark, pytestconfig, copy_bandwidth, bench_record):
    """``run_benchmark(op, mode, size, provider, direction=None, bins=None)``: one benchmark.

    float32 inputs of shape (numel // 256, 256), or the size's shape ('256x3x64x64') for the
    diffusion ops (_common.bench_shape, _common.make_inputs). One
    ``benchmark.pedantic`` call: a warm-up call (where torch.compile compiles) and the
    sanity checks first, outside the timing, then as many rounds as fit
    ``--benchmark-max-time`` (at least ``--benchmark-min-rounds``). A failed check fails the
    test, except for the ``compile`` baseline, where it is an xfail (torch.compile's bug, not
    ours; not timed). forward_backward times
    forward + ``torch.autograd.backward(outputs, grads)``, every input's ``.grad`` set to
    None between rounds outside the timing (``zero_grad(set_to_none=True)``); the outputs
    and inputs are _common.diff_outputs / grad_inputs (the diffusion loss: the loss alone,
    w.r.t. model_output alone). Group:
    ``<op>[-<direction>][-K<bins>]-<mode>-<size>``; extra_info has the minimum bytes, GB/s
    and the fraction of the session's copy bandwidth, which the summary prints too.
    """
    import torch

    import pygen

    dtype = torch.float32

    def run(op: str, mode: str, size: str, provider: str, *, direction: str | None = None,
            bins: int | None = None) -> None:
        if provider.startswith("pygen-") and provider[len("pygen-"):] not in pygen.available_backends():
            pytest.skip(f"backend {provider[len('pygen-'):]} is not available here: {pygen.available_backends()}")
        var = {k: v for k, v in (("direction", direction), ("bins", bins)) if v is not None}
        shape = bench_shape(size)
        numel = math.prod(shape)
        backward = mode == "forward_backward"
        fn = provider_fn(provider, op, direction=direction)
        inputs = make_inputs(shape, dtype, "cpu", requires_grad=backward, op=op, bins=bins)
        what = f"{provider} {variant_label(op, **var)}"

        def fail(err: str) -> None:
            if provider == "compile":  # a baseline broken by torch.compile: reported, not timed
                pytest.xfail(f"torch.compile's result fails the sanity check, not timed: {what}: {err}")
            pytest.fail(f"{what}: {err}")

        # Warm-up outside the timing (this is where torch.compile compiles), with a sanity check.
        outs = fn(*inputs)
        if err := check_outputs(op, outs, inputs, direction=direction):
            fail(err)
        if backward:
            grads = make_grads(op, inputs[0])
            wrt = grad_inputs(inputs)

            def target():
                torch.autograd.backward(diff_outputs(op, fn(*inputs)), grads)

            def setup():  # what optimizer.zero_grad(set_to_none=True) does between steps
                for t in wrt:
                    t.grad = None

            setup()
            torch.autograd.backward(diff_outputs(op, outs), grads)
            if err := check_grads(op, inputs, grads, [t.grad for t in wrt], direction=direction, outs=outs):
                fail(f"backward: {err}")
            setup()
        else:

            def target():
                return fn(*inputs)

            setup = None
        del outs

        nbytes = bytes_moved(op, mode, shape[0], numel, dtype.itemsize, **var)
        benchmark.group = f"{variant_label(op, **var)}-{mode}-{size}"
        benchmark.extra_info.update(op=op, **var)
        benchmark.extra_info.update(
            mode=mode, provider=provider, numel=numel, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
            bytes=nbytes, threads=torch.get_num_threads(), copy_gbps=copy_bandwidth["gbps"],
        )
        if note := bytes_note(op):  # the diffusion ops: what ``bytes`` counts
            benchmark.extra_info["bytes_counted"] = note
        if benchmark.disabled:
            benchmark.pedantic(target, setup=setup, rounds=1, iterations=1)
            return
        rounds = _rounds(target, setup, float(pytestconfig.getoption("benchmark_max_time")),
                         int(pytestconfig.getoption("benchmark_min_rounds")))
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
        cpu1, wall = _cpu_seconds(), time.perf_counter() - t0
        # cores other processes kept busy while this benchmark ran (0 on a quiet machine)
        other = max(0.0, (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])) / wall if cpu0 and cpu1 else None

        median = benchmark.stats.stats.median
        gbps = nbytes / median / 1e9
        benchmark.extra_info.update(rounds=rounds, gbps=gbps, copy_fraction=gbps / copy_bandwidth["gbps"],
                                    other_cores=other)
        bench_record({"group": benchmark.group, "provider": provider, "median_s": median, "gbps": gbps,
                      "copy_fraction": gbps / copy_bandwidth["gbps"], "other_cores": other})

    return run


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    # Results files are committed (benchmarks/results/): keep the hostname out of them.
    machine_info.pop("node", None)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    import torch

    import pygen

    if os.environ.get("PYGEN_BENCH_KEEP_DATA", "") in ("", "0"):
        for b in output_json.get("benchmarks", []):  # every round's time: megabytes, not needed
            (b.get("stats") or {}).pop("data", None)
    output_json["pygen"] = {
        "pygen_version": pygen.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "backends": pygen.available_backends(),
        "copy_bandwidth": config.stash.get(_copy_key, None),
        "bytes_model": "each input read once, each output written once; see _common.bytes_moved",
    }


def pytest_terminal_summary(terminalreporter, config):
    records = [r for r in config.stash.get(_records_key, []) if r.get("median_s")]
    if not records:
        return
    bw = config.stash.get(_copy_key, {})
    tr = terminalreporter
    tr.section("pygen: achieved bandwidth")
    tr.write_line(f"copy bandwidth: {bw.get('gbps', float('nan')):.2f} GB/s "
                  f"(dst.copy_(src), {bw.get('tensor_bytes', 0) >> 20} MiB float32, read+write, "
                  f"{bw.get('threads')} threads)")
    width = max(40, *(len(r["group"]) for r in records))
    tr.write_line("other: cores busy with other processes while a benchmark ran (> 0.1: its time is suspect)")
    tr.write_line(f"{'group':<{width}} {'provider':<10} {'median':>11} {'GB/s':>8} {'copy':>6} {'vs eager':>9} {'vs compile':>10}"
                  f" {'other':>6}")
    by_group: dict[str, dict[str, dict]] = {}
    for r in records:
        by_group.setdefault(r["group"], {})[r["provider"]] = r
    for group, rows in by_group.items():
        for provider, r in rows.items():
            ms = r["median_s"] * 1e3
            sp = []
            for base in ("eager", "compile"):
                b = rows.get(base)
                sp.append(f"{b['median_s'] / r['median_s']:.2f}x" if b else "-")
            other = r.get("other_cores")
            tr.write_line(f"{group:<{width}} {provider:<10} {ms:>9.3f}ms {r['gbps']:>8.2f} {r['copy_fraction']:>6.1%} "
                          f"{sp[0]:>9} {sp[1]:>10} {(f'{other:.2f}' if other is not None else '-'):>6}")
