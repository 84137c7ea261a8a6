"""Test configuration: Triton runs under its interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton (and pygen) are imported.
"""

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pygen  # noqa: E402
from pygen.testing import poison_outputs  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def backend_devices() -> list[tuple[str, str]]:
    """(backend, device) pairs that can run here; the torch reference runs everywhere."""
    pairs = [("torch", "cpu")]
    avail = pygen.available_backends()
    if "cpp" in avail:
        pairs.append(("cpp", "cpu"))
    if "cuda" in avail:
        pairs.append(("cuda", "cuda"))
    if "triton" in avail:
        pairs.append(("triton", "cuda" if HAS_CUDA else "cpu"))
    return pairs


BACKEND_DEVICES = backend_devices()
COMPILED = [(b, d) for b, d in BACKEND_DEVICES if b != "torch"]


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    if device == "cpu":
        return [torch.float32, torch.float64]
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]


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
