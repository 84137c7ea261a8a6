"""Backend selection: per-GPU runnability of the compiled CUDA kernels and thread-local use_backend.

There is no GPU in CPU CI: the device's compute capability and the machine-level availability
are faked with monkeypatch; ``resolve`` only needs a ``torch.device("cuda", i)``, not a GPU.
"""

import threading
import warnings

import pytest
import torch

from pygen import _backend


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine whose pygen build has CUDA kernels, with GPUs of the capabilities set in ``caps``."""
    caps = {0: (8, 0)}
    monkeypatch.setattr(_backend, "_UNAVAILABLE", {})  # every backend compiled and present
    monkeypatch.setattr(_backend, "_DEVICE_STATUS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: caps[0 if d is None else int(d)])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"Fake GPU {d}")
    return caps


GPU = torch.device("cuda", 0)


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_auto_picks_cuda_where_the_build_runs(fake_gpu, cap):
    fake_gpu[0] = cap
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve(None, GPU, torch.float32) == "cuda"
        assert _backend.resolve("cuda", GPU, torch.float32) == "cuda"
    assert _backend.backend_status(0)["cuda"] is None


@pytest.mark.parametrize("cap", [(7, 5), (7, 0), (6, 1)])
def test_auto_falls_back_on_a_gpu_the_build_has_no_image_for(fake_gpu, cap):
    fake_gpu[0] = cap
    sm = f"sm_{cap[0]}{cap[1]}"
    with pytest.warns(UserWarning, match=sm) as rec:
        assert _backend.resolve(None, GPU, torch.float32) == "triton"
    assert "sm_80" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per device, not per call
        assert _backend.resolve(None, GPU, torch.float16) == "triton"
        assert _backend.resolve(None, torch.device("cuda"), torch.float32) == "triton"  # "cuda" is cuda:0
    with pytest.raises(RuntimeError, match=f"{sm}.*sm_80"):
        _backend.resolve("cuda", GPU, torch.float32)
    with _backend.use_backend("cuda"), pytest.raises(RuntimeError, match=sm):
        _backend.resolve(None, GPU, torch.float32)
    assert sm in _backend.backend_status(0)["cuda"]
    # without Triton: the torch reference
    _backend._UNAVAILABLE["triton"] = "triton is not installed"
    assert _backend.resolve(None, GPU, torch.float32) == "torch"


def test_decision_is_per_device(fake_gpu):
    fake_gpu.update({0: (8, 6), 1: (7, 5)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _backend.resolve(None, torch.device("cuda", 1), torch.float32) == "triton"
        assert _backend.resolve(None, torch.device("cuda", 0), torch.float32) == "cuda"
    assert set(_backend._DEVICE_STATUS) == {0, 1}


def test_arch_parsing():
    ok = _backend._cuda_image_runs
    built = _backend._parse_archs("80-real;90a-real;90-virtual")
    assert ok((8, 0), built) and ok((8, 9), built) and ok((9, 0), built) and ok((12, 0), built)
    assert not ok((7, 5), built) and not ok((7, 0), built)
    sass_only = _backend._parse_archs(["80-real", "90a-real"])
    assert ok((9, 0), sass_only) and not ok((10, 0), sass_only)  # sm_90a cubins run on 9.0 only
    assert ok((7, 5), _backend._parse_archs("75"))  # plain NN: SASS and PTX
    assert ok((8, 6), _backend._parse_archs("75"))  # PTX JIT-compiles for newer GPUs
    assert not ok((8, 6), _backend._parse_archs("90"))


def test_backend_status_names_every_backend():
    st = _backend.backend_status()
    assert set(st) == set(_backend.BACKENDS[1:]) and st["torch"] is None
    assert [b for b, why in st.items() if why is None] == _backend.available_backends()
    assert all(why is None or isinstance(why, str) and why for why in st.values())


def test_use_backend_is_per_thread(monkeypatch):
    """Two threads each inside their own use_backend, interleaved, see their own choice."""
    monkeypatch.setattr(_backend, "_UNAVAILABLE", {})
    barrier = threading.Barrier(2, timeout=30)
    seen: dict[str, list[str]] = {}

    def run(name):
        with _backend.use_backend(name):
            barrier.wait()  # both are inside their block
            seen[name] = [_backend.requested(None)]
            barrier.wait()
        seen[name].append(_backend.requested(None))
        barrier.wait()  # both have left
        seen[name].append(_backend.requested(None))

    threads = [threading.Thread(target=run, args=(n,)) for n in ("torch", "triton")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert seen == {"torch": ["torch", "auto", "auto"], "triton": ["triton", "auto", "auto"]}


def test_use_backend_nests_and_restores_on_error(monkeypatch):
    monkeypatch.setattr(_backend, "_UNAVAILABLE", {})
    with _backend.use_backend("torch"):
        with pytest.raises(KeyError), _backend.use_backend("cpp"):
            assert _backend.requested(None) == "cpp"
            raise KeyError
        assert _backend.requested(None) == "torch"
        assert _backend.requested("triton") == "triton"
    assert _backend.requested(None) == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        with _backend.use_backend("tpu"):
            pass
