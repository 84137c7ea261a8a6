"""The (backend, device) pairs and dtypes the tests run on this machine."""

import torch

import pygen

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
