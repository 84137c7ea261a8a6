"""The Philox scheme shared by every backend: known answers, cross-backend equality,
seeding semantics (manual_seed, generator=, batch-size invariance) and N(0, 1) statistics."""

import math

import pytest
import torch

import pygen
from pygen import _ext, _rng
from pygen.ops import reparameterize

from backends_under_test import BACKEND_DEVICES

# Random123's known-answer vectors for Philox4x32-10: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers_torch(ctr, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    keys = [torch.tensor([k], dtype=torch.int64) for k in key]
    out = _rng.philox4x32_10(*words, *keys)
    assert tuple(int(o) for o in out) == expected


@pytest.mark.skipif(not _ext.HAS_CPP, reason="C++ extension not built")
@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers_cpp(ctr, key, expected):
    assert tuple(_ext._C.philox4x32_10(*ctr, *key)) == expected


def _noise(backend, device, n, seed, offset=0, rows=1):
    zeros = torch.zeros(rows, n // rows, device=device)
    return reparameterize(zeros, zeros, seed=seed, offset=offset, backend=backend).float().cpu().flatten()


@pytest.mark.parametrize("offset", [0, 12345, 2**32 - 100, 3 * 2**32 + 7])
def test_noise_is_the_same_on_every_backend(offset):
    """Same (seed, offset): the same eps everywhere, up to a few ulp of logf/cosf."""
    seed = int(torch.randint(0, 2**62, ()))
    ref = _rng.philox_normal(torch.tensor([seed]), offset, (4096,))
    for backend, device in BACKEND_DEVICES:
        eps = _noise(backend, device, 4096, seed, offset)
        torch.testing.assert_close(eps, ref, rtol=4e-6, atol=4e-6, msg=f"{backend} differs")
    if offset + 4096 > 2**32:  # counters past 2**32 carry into the second word, not wrap
        first_high = max(0, 2**32 - offset)
        wrapped = _rng.philox_normal(torch.tensor([seed]), (offset + first_high) % 2**32, (4096 - first_high,))
        assert not torch.allclose(ref[first_high:], wrapped)


HAS_TRITON = "triton" in pygen.available_backends()
if HAS_TRITON:
    import triton
    import triton.language as tl

    from pygen.kernels.philox import randn_at

    @triton.jit
    def _tl_randn4x_and_randn_at(out_a, out_b, seed, base, N: tl.constexpr):
        # block k of tl.randn4x gives counters 4k .. 4k + 3
        k = tl.arange(0, N // 4) + base // 4
        n1, n2, n3, n4 = tl.randn4x(seed, k)
        four = tl.arange(0, N // 4) * 4
        tl.store(out_a + four, n1)
        tl.store(out_a + four + 1, n2)
        tl.store(out_a + four + 2, n3)
        tl.store(out_a + four + 3, n4)
        tl.store(out_b + tl.arange(0, N), randn_at(seed, tl.arange(0, N).to(tl.int64) + base))


@pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable")
def test_triton_helper_equals_tl_randn4x():
    """The stream: counter g is component g % 4 of tl.randn4x(seed, g // 4)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.full((256,), float("nan"), device=device)
    b = torch.full((256,), float("nan"), device=device)
    seed = int(torch.randint(0, 2**31, ()))
    _tl_randn4x_and_randn_at[(1,)](a, b, seed, 1000, N=256)
    assert torch.equal(a, b)


def test_every_philox_word_is_used():
    """Four consecutive counters share one Philox block: its two Box-Muller pairs give
    r_A cos, r_A sin, r_B cos, r_B sin (so r_A^2 = n0^2 + n1^2 from words 0 and 1 alone)."""
    seed = torch.tensor([123456789])
    n = _rng.philox_normal(seed, 8, (8,)).double()
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    zero = torch.zeros(1, dtype=torch.int64)
    for blk, start in ((2, 0), (3, 4)):
        w = _rng.philox4x32_10(torch.tensor([blk]), zero, zero, zero, k0, k1)
        for pair in range(2):
            u1 = _rng._uniform(w[2 * pair]).double().clamp_min(1e-7)
            th = 2 * math.pi * _rng._uniform(w[2 * pair + 1]).double()
            r = torch.sqrt(-2 * torch.log(u1))
            got = n[start + 2 * pair: start + 2 * pair + 2]
            torch.testing.assert_close(got, torch.cat([r * torch.cos(th), r * torch.sin(th)]), rtol=1e-5, atol=1e-5)
    if _ext.HAS_CPP:
        for g in range(8, 16):
            assert abs(_ext._C.philox_normal(123456789, g) - float(n[g - 8])) < 1e-5


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 5, 2**32 * 4 - 3])
def test_unaligned_chunks_equal_the_whole_draw(backend_device, offset):
    """A chunk that starts or ends inside a Philox block equals that part of the whole draw."""
    backend, device = backend_device
    seed = 77
    whole = _noise(backend, device, 64, seed, offset)
    for a, b in ((0, 3), (3, 10), (10, 61), (61, 64)):
        part = _noise(backend, device, b - a, seed, offset + a)
        assert torch.equal(part, whole[a:b]), (a, b)


def test_manual_seed_and_generator_are_honoured(backend_device):
    backend, device = backend_device
    mu = torch.randn(3, 50, device=device)
    lv = torch.randn(3, 50, device=device)
    torch.manual_seed(7)
    a = reparameterize(mu, lv, backend=backend)
    b = reparameterize(mu, lv, backend=backend)
    torch.manual_seed(7)
    a2 = reparameterize(mu, lv, backend=backend)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b), "successive calls must not reuse noise"
    g1 = torch.Generator(device=device).manual_seed(123)
    g2 = torch.Generator(device=device).manual_seed(123)
    assert torch.equal(reparameterize(mu, lv, generator=g1, backend=backend), reparameterize(mu, lv, generator=g2, backend=backend))
    assert not torch.equal(reparameterize(mu, lv, generator=g1, backend=backend), a)


def test_sample_noise_does_not_depend_on_batch_size_or_chunking(backend_device):
    backend, device = backend_device
    mu = torch.randn(10, 33, device=device)
    lv = torch.randn(10, 33, device=device)
    seed = int(torch.randint(0, 2**62, ()))
    full = reparameterize(mu, lv, seed=seed, backend=backend)
    head = reparameterize(mu[:4], lv[:4], seed=seed, backend=backend)
    tail = reparameterize(mu[4:], lv[4:], seed=seed, offset=4 * 33, backend=backend)
    assert torch.equal(full[:4], head)
    assert torch.equal(full[4:], tail)


def test_cpp_result_does_not_depend_on_thread_count():
    if "cpp" not in pygen.available_backends():
        pytest.skip("C++ extension not built")
    mu, lv = torch.randn(3, 20000), torch.randn(3, 20000)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        z1, kl1 = pygen.ops.reparameterize_kl(mu, lv, seed=5, backend="cpp")
        torch.set_num_threads(max(2, n))
        z2, kl2 = pygen.ops.reparameterize_kl(mu, lv, seed=5, backend="cpp")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(z1, z2) and torch.equal(kl1, kl2)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 3])
def test_noise_is_standard_normal(seed):
    """Moments and a Kolmogorov-Smirnov test on 2**20 draws of the C++ (else torch) path.

    Seeds are fixed so that the test is deterministic: with fresh seeds a correct
    generator would still fail the 0.1% KS test once in a thousand runs.
    """
    backend = "cpp" if "cpp" in pygen.available_backends() else "torch"
    n = 2**20
    x = _noise(backend, "cpu", n, seed, rows=16).double()
    se = 1 / math.sqrt(n)
    assert abs(x.mean().item()) < 5 * se
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2) * se
    assert abs((x**3).mean().item()) < 5 * math.sqrt(15) * se  # skewness
    assert abs((x**4).mean().item() - 3) < 5 * math.sqrt(96) * se  # kurtosis
    s, _ = torch.sort(x)
    cdf = _normal_cdf(s)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert d < 1.95 / math.sqrt(n), f"KS statistic {d:.2e}"  # alpha = 0.001
    lag1 = torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1].item()
    assert abs(lag1) < 5 * se
    # a different seed gives an independent stream
    y = _noise(backend, "cpu", n, seed + 1, rows=16).double()
    assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 5 * se


def test_seed_arguments_are_checked():
    mu = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="either seed= or generator="):
        reparameterize(mu, mu, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        reparameterize(mu, mu, seed=-1)
    with pytest.raises(TypeError, match="seed must be a one-element int64 tensor"):
        reparameterize(mu, mu, seed=torch.tensor([1.0]))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        reparameterize(mu, mu, generator=3)
    with pytest.raises(ValueError, match="offset must be in"):
        reparameterize(mu, mu, offset=-5)
    with pytest.raises(TypeError, match="offset must be an int"):
        reparameterize(mu, mu, offset=1.5)


def test_cpu_builds_for_every_isa_give_identical_results():
    """The baseline / AVX2 / AVX-512 builds differ in vector width only, never in results."""
    if "cpp" not in pygen.available_backends():
        pytest.skip("C++ extension not built")
    C = _ext._C
    mu, lv = torch.randn(5, 9000), torch.randn(5, 9000)
    pm, pl = torch.randn(9000), torch.randn(5, 9000)
    g = torch.randn(5, 9000)
    before = C._cpu_isa()
    results = {}
    try:
        for isa in ("baseline", "avx2", "avx512"):
            if not C._set_cpu_isa(isa):
                continue
            m, v = mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)
            z, kl = pygen.ops.reparameterize_kl(m, v, seed=9, backend="cpp")
            kl_p = pygen.ops.gaussian_kl(m, v, pm, pl, backend="cpp")
            grads = torch.autograd.grad((z, kl, kl_p), (m, v), (g, kl.detach() * 0 + 1, kl_p.detach() * 0 + 2))
            results[isa] = (z, kl, kl_p, *grads)
    finally:
        C._set_cpu_isa(before)
    base = results["baseline"]
    for isa, res in results.items():
        for a, b in zip(res, base):
            assert torch.equal(a, b), isa
