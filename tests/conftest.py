"""Test configuration: Triton runs under its interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton (and pygen) are imported.
"""

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from pygen.testing import poison_outputs  # noqa: E402

from backends_under_test import BACKEND_DEVICES, COMPILED  # noqa: E402


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every kernel output starts as NaN: an element a kernel does not write fails the test."""
    with poison_outputs():
        yield


@pytest.fixture(params=BACKEND_DEVICES, ids=lambda p: f"{p[0]}-{p[1]}")
def backend_device(request):
    return request.param


@pytest.fixture(params=COMPILED, ids=lambda p: f"{p[0]}-{p[1]}")
def compiled_backend(request):
    return request.param


@pytest.fixture
def fashion_mnist():
    """Skips the test when Debian's dataset-fashion-mnist is not installed (make data)."""
    import pygen.data as D

    try:
        D.files._fashion_mnist_file("test")
    except D.DataError:
        pytest.skip("Fashion-MNIST is not installed (make data)")


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny models: faster, and immune to OpenMP threads that wait
    for a busy core on a shared machine (a tiny matmul then took milliseconds). Kernel tests
    keep the default thread count, so the CPU kernels' parallel paths stay covered."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """``trained_run(name, model, data, **fit_kwargs) -> Path``: a run directory of ``model``
    trained by pygen.train.fit on one torch thread (tiny models), for module-scoped fixtures."""
    from pygen.train import fit

    def make(name, model, data, **kw):
        run = tmp_path_factory.mktemp("run") / name
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fit(model, data, out=run, progress=False, **kw)
        finally:
            torch.set_num_threads(threads)
        return run

    return make
