"""pytest options, the session's copy-bandwidth measurement and a bandwidth summary.

Options (each also an environment variable, handy in CI):
  --bench-quick      PYGEN_BENCH_QUICK=1        sizes 1e4 and 1e5 only (a smoke test)
  --bench-sizes      PYGEN_BENCH_SIZES=1e4,1e6   the sizes (numel) to run
  --bench-providers  PYGEN_BENCH_PROVIDERS=...   subset of pygen-cpp,eager,compile
Rounds per benchmark follow pytest-benchmark's --benchmark-max-time (default 1 s) and
--benchmark-min-rounds (default 5); see bench_gaussian.py.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _baselines, _common

from _common import CPU_SIZES as ALL_SIZES  # noqa: E402
from _common import OPS, measure_cpu_copy_bandwidth  # noqa: E402

QUICK_SIZES = ("1e4", "1e5")
ALL_PROVIDERS = ("pygen-cpp", "eager", "compile")
CPU_MODES = ("forward", "forward_backward")

_copy_key = pytest.StashKey[dict]()
_records_key = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("pygen-bench", "pygen benchmarks")
    group.addoption("--bench-quick", action="store_true", default=None,
                    help="only sizes 1e4 and 1e5 (env PYGEN_BENCH_QUICK=1)")
    group.addoption("--bench-sizes", default=None,
                    help=f"comma list from {','.join(ALL_SIZES)} (env PYGEN_BENCH_SIZES)")
    group.addoption("--bench-providers", default=None,
                    help=f"comma list from {','.join(ALL_PROVIDERS)} (env PYGEN_BENCH_PROVIDERS)")


def _csv(value: str, allowed, what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise pytest.UsageError(f"{what}: {value!r}; choose from {','.join(allowed)}")
    return items


def bench_sizes(config) -> tuple[str, ...]:
    sizes = config.getoption("--bench-sizes") or os.environ.get("PYGEN_BENCH_SIZES")
    if sizes:
        return _csv(sizes, ALL_SIZES, "--bench-sizes")
    quick = config.getoption("--bench-quick") or os.environ.get("PYGEN_BENCH_QUICK", "") not in ("", "0")
    return QUICK_SIZES if quick else tuple(ALL_SIZES)


def bench_providers(config) -> tuple[str, ...]:
    providers = config.getoption("--bench-providers") or os.environ.get("PYGEN_BENCH_PROVIDERS")
    return _csv(providers, ALL_PROVIDERS, "--bench-providers") if providers else ALL_PROVIDERS


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py when pytest walks this directory (``pytest benchmarks``).

    A file named on the command line is collected by pytest itself whatever its name, so
    only the directory walk needs this (and doing both would collect it twice).
    """
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    """Parametrize test functions taking (op, mode, size, provider); 1e7 is marked slow."""
    if "provider" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for op in OPS:
        for mode in CPU_MODES:
            for size in bench_sizes(metafunc.config):
                for provider in bench_providers(metafunc.config):
                    marks = [pytest.mark.slow] if ALL_SIZES[size] >= 10**7 else []
                    params.append(pytest.param(op, mode, size, provider, marks=marks))
                    ids.append(f"{op}-{mode}-{size}-{provider}")
    metafunc.parametrize("op,mode,size,provider", params, ids=ids)


def pytest_configure(config):
    config.stash[_records_key] = []
    # Raised inside torch.compile's imports on some versions; not ours to act on.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_report_header(config):
    import torch

    import pygen

    return (f"pygen {pygen.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"backends {pygen.available_backends()}, sizes {','.join(bench_sizes(config))}, "
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
    tr.write_line(f"{'group':<40} {'provider':<10} {'median':>11} {'GB/s':>8} {'copy':>6} {'vs eager':>9} {'vs compile':>10}")
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
            tr.write_line(f"{group:<40} {provider:<10} {ms:>9.3f}ms {r['gbps']:>8.2f} {r['copy_fraction']:>6.1%} "
                          f"{sp[0]:>9} {sp[1]:>10}")
