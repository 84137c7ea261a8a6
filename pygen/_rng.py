"""Seeds from torch's generators, and the pure-torch Philox normal draw.

The noise stream, identical on every backend (``csrc/include/pygen/philox.h``,
``csrc/cpu/noise.h``, ``kernels/philox.py`` and :func:`philox_normal` here): element i of a
draw with ``offset`` has counter g = offset + i. Philox4x32-10 with key ``seed`` and counter
(lo32(g // 4), hi32(g // 4), 0, 0) gives four 32-bit words w0..w3, turned into uniforms
u0..u3 by Triton's conversion. Two Box-Muller pairs, (u0, u1) and (u2, u3), with
r = sqrt(-2 log max(u_a, 1e-7)) and th = 2 pi u_b, give the four normals of counters
4b, 4b+1, 4b+2, 4b+3: r_A cos th_A, r_A sin th_A, r_B cos th_B, r_B sin th_B (Triton's
``tl.randn4x(seed, b)``). Every word of a Philox block is used; a chunk of a batch drawn
alone (its own offset) equals that chunk of the whole draw, whatever its alignment.

The seed is an int64 tensor on the op's device, drawn from a torch generator, so
``torch.manual_seed`` and ``generator=`` are honoured, no host sync is needed and a CUDA
graph can capture it.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MUL_A, _MUL_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_SEED_HIGH = 2**63 - 1


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh int64 seed of shape (1,) on ``device``, drawn from ``generator`` (or the default)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the tensors are on {device}; "
                f"pass a generator of the tensors' device"
            )
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device, generator=generator)


def as_seed(
    seed: int | torch.Tensor | None, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Normalise the ``seed=`` argument of the ops to an int64 (1,) tensor on ``device``."""
    if seed is None:
        return draw_seed(device, generator)
    if generator is not None:
        raise ValueError("pass either seed= or generator=, not both")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed must be a one-element int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"seed is on {seed.device} but the tensors are on {device}")
        return seed.reshape(1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, an int64 tensor or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def check_offset(offset: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if not 0 <= offset < 2**62:
        raise ValueError(f"offset must be in [0, 2**62), got {offset}")
    return offset


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for a 32-bit constant and int64 tensor b in [0, 2**32).

    Split b in 16-bit halves so that no intermediate leaves int64 (no reliance on wrap-around).
    """
    lo_part = a * (b & 0xFFFF)
    hi_part = a * (b >> 16)
    t = ((hi_part & 0xFFFF) << 16) + lo_part
    return (hi_part >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 words; returns the four output words."""
    for _ in range(10):
        hi_a, lo_a = _mulhilo(_MUL_A, c0)
        hi_b, lo_b = _mulhilo(_MUL_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: as int32, fold negatives, scale into [0, 1)."""
    v = torch.where(bits >= 2**31, bits - 2**32, bits)
    v = torch.where(v < 0, -v - 1, v)
    return v.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=bits.device)


def philox_normal(seed: torch.Tensor, offset: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """float32 normals of ``shape``; element i (row-major) is the draw of counter ``offset + i``."""
    n = 1
    for s in shape:
        n *= s
    ctr = offset + torch.arange(n, dtype=torch.int64, device=seed.device)
    block = ctr >> 2
    seed = seed.reshape(1)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    zero = torch.zeros_like(block)
    r0, r1, r2, r3 = philox4x32_10(block & _MASK32, block >> 32, zero, zero, k0, k1)
    second = (ctr & 2) != 0
    u1 = _uniform(torch.where(second, r2, r0)).clamp_min(1.0e-7)
    th = torch.tensor(6.283185307179586, dtype=torch.float32, device=seed.device) * _uniform(torch.where(second, r3, r1))
    trig = torch.where((ctr & 1) != 0, torch.sin(th), torch.cos(th))
    return (torch.sqrt(-2.0 * torch.log(u1)) * trig).reshape(shape)
