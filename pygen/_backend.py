"""Backend names, availability and selection (argument > ``use_backend`` > ``"auto"``)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import warnings
from collections.abc import Iterator, Sequence

import torch

from pygen import _ext

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")
# dtypes each compiled backend implements; "torch" takes any floating dtype.
CPP_DTYPES = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CUDA_AVAILABLE = torch.cuda.is_available()

# The CUDA architectures the kernels are compiled for, in CMAKE_CUDA_ARCHITECTURES syntax: what
# the extension reports (`_C.cuda_archs()`, set by CMakeLists.txt), else CMakeLists.txt's default
# ("80-real;90a-real;90-virtual": sm_80 and sm_90a cubins plus compute_90 PTX, which the driver
# JIT-compiles for newer GPUs).
DEFAULT_CUDA_ARCHS = "80-real;90a-real;90-virtual"


def _parse_archs(archs: str | Sequence[str]) -> list[tuple[int, int, str, str]]:
    """(major, minor, suffix, kind) per image; kind "sass" (a cubin) or "ptx" (JIT-compilable)."""
    entries = archs.replace(",", ";").split(";") if isinstance(archs, str) else list(archs)
    out = []
    for e in entries:
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(\d)([af]?)(-real|-virtual)?", e.strip())
        if m is None:  # "all", "native", ...: we cannot tell, so we do not stand in the way
            out.append((0, 0, "", "ptx"))
            continue
        major, minor, suffix, kind = int(m[1]), int(m[2]), m[3], m[4]
        if kind != "-virtual":
            out.append((major, minor, suffix, "sass"))
        if kind != "-real":
            out.append((major, minor, suffix, "ptx"))
    return out


def _cuda_image_runs(cap: tuple[int, int], images: list[tuple[int, int, str, str]]) -> bool:
    """Whether a GPU of compute capability ``cap`` can run one of ``images`` (CUDA's rules: a
    cubin runs on its major version at an equal or higher minor, an "a" cubin on its exact
    version only; generic PTX JIT-compiles for any equal or newer GPU)."""
    for major, minor, suffix, kind in images:
        if suffix == "a":
            ok = cap == (major, minor)
        elif kind == "sass" or suffix == "f":
            ok = cap[0] == major and cap[1] >= minor
        else:
            ok = cap >= (major, minor)
        if ok:
            return True
    return False


def _built_archs() -> str | Sequence[str]:
    fn = getattr(_ext._C, "cuda_archs", None)
    return (fn() if fn is not None else "") or DEFAULT_CUDA_ARCHS


def _sm_names(archs: str | Sequence[str]) -> str:
    return ", ".join(
        f"sm_{ma}{mi}{s}" if kind == "sass" else f"compute_{ma}{mi}{s} (PTX)" for ma, mi, s, kind in _parse_archs(archs)
    )


def _triton_status() -> str | None:
    """None when Triton kernels can run here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if not (_CUDA_AVAILABLE or _INTERPRET):
        return "no CUDA device (set TRITON_INTERPRET=1 before importing pygen to run Triton on CPU)"
    return None


# Machine-level reasons (decided at import, without initialising CUDA).
_UNAVAILABLE: dict[str, str] = {}
if not _ext.HAS_CPP:
    _UNAVAILABLE["cpp"] = f"the compiled extension pygen._C did not load ({_ext.LOAD_ERROR})"
if not _ext.HAS_CUDA_KERNELS:
    _UNAVAILABLE["cuda"] = "pygen was built without CUDA kernels"
elif not _CUDA_AVAILABLE:
    _UNAVAILABLE["cuda"] = "no CUDA device is available"
if (why := _triton_status()) is not None:
    _UNAVAILABLE["triton"] = why

# Per GPU index: None when the compiled CUDA kernels run on it, else why not. Filled on the
# first call that needs it (reading the capability initialises CUDA, which import must not do).
_DEVICE_STATUS: dict[int, str | None] = {}

# The use_backend setting: a ContextVar, so that each thread (and asyncio task) has its own.
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("pygen_backend", default=None)


def _cuda_device_status(index: int) -> str | None:
    """None when pygen's compiled CUDA kernels can run on GPU ``index``, else why not (cached;
    the first "not runnable" answer for a GPU is also given as a warning, once)."""
    if index not in _DEVICE_STATUS:
        cap = tuple(torch.cuda.get_device_capability(index))
        archs = _built_archs()
        why = None
        if not _cuda_image_runs(cap, _parse_archs(archs)):
            why = (f"cuda:{index} ({torch.cuda.get_device_name(index)}) is sm_{cap[0]}{cap[1]}, and pygen's CUDA "
                   f"kernels were built for {_sm_names(archs)} only; rebuild with "
                   f"-DCMAKE_CUDA_ARCHITECTURES={cap[0]}{cap[1]} to run them there")
            warnings.warn(f"{why}. backend='auto' uses Triton or the torch reference on this GPU.", stacklevel=4)
        _DEVICE_STATUS[index] = why
    return _DEVICE_STATUS[index]


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def backend_status(device: torch.device | int | None = None) -> dict[str, str | None]:
    """Each backend (``"torch"``, ``"cpp"``, ``"cuda"``, ``"triton"``) mapped to None when it can
    run, else a sentence saying why not. "cuda" is judged on GPU ``device`` (default: the current
    one), whose compute capability must be among the architectures pygen was built for."""
    status: dict[str, str | None] = {b: _UNAVAILABLE.get(b) for b in BACKENDS[1:]}
    if status["cuda"] is None:
        index = device if isinstance(device, int) else (
            _cuda_index(torch.device(device)) if device is not None else torch.cuda.current_device())
        status["cuda"] = _cuda_device_status(index)
    return status


def available_backends() -> list[str]:
    """The backends that can run on this machine, e.g. ``['torch', 'cpp']``.

    Decided without initialising CUDA: "cuda" means compiled kernels and a GPU; whether a given
    GPU can run them is :func:`backend_status`'s answer."""
    return [b for b in BACKENDS[1:] if b not in _UNAVAILABLE]


def _validate(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name in _UNAVAILABLE:
        raise RuntimeError(
            f"backend {name!r} is not available: {_UNAVAILABLE[name]}; "
            f"available backends: {available_backends()}"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run pygen ops in this block on ``name`` unless a call passes ``backend=`` itself.

    The setting belongs to the calling thread (asyncio task): other threads keep theirs."""
    token = _current.set(_validate(name))
    try:
        yield
    finally:
        _current.reset(token)


@torch.compiler.assume_constant_result
def _setting() -> str:
    # Dynamo cannot trace ContextVar.get: under torch.compile the setting is read once, when
    # the graph is traced, and baked into it (a use_backend block around a compiled call that
    # was traced outside it does not re-trace: pass backend= to the op for that)
    return _current.get() or "auto"


def requested(backend: str | None) -> str:
    """What the caller asked for: the argument, else the ``use_backend`` setting, else "auto"."""
    return backend if backend is not None else _setting()


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for a call on tensors of ``device`` and ``dtype``."""
    name = _validate(requested(backend))
    if name == "auto":
        if device.type == "cuda" and dtype in GPU_DTYPES:
            if "cuda" not in _UNAVAILABLE and _cuda_device_status(_cuda_index(device)) is None:
                return "cuda"
            if "triton" not in _UNAVAILABLE:
                return "triton"
        elif device.type == "cpu" and "cpp" not in _UNAVAILABLE and dtype in CPP_DTYPES:
            return "cpp"
        return "torch"
    if name == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors; got tensors on {device}")
        if dtype not in CPP_DTYPES:
            raise TypeError(f"backend 'cpp' supports float32 and float64; got {dtype} (use backend='torch')")
    elif name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors; got tensors on {device}")
        if dtype not in GPU_DTYPES:
            raise TypeError(f"backend 'cuda' supports {GPU_DTYPES}; got {dtype}")
        if (why := _cuda_device_status(_cuda_index(device))) is not None:
            raise RuntimeError(f"backend 'cuda' cannot run here: {why}; use backend='triton', 'torch' or 'auto'")
    elif name == "triton":
        if device.type == "cpu" and not _INTERPRET:
            raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend 'triton' runs on CUDA tensors; got tensors on {device}")
        if dtype not in GPU_DTYPES:
            raise TypeError(f"backend 'triton' supports {GPU_DTYPES}; got {dtype}")
    return name
