"""The Philox normal draw of every pygen backend, for Triton kernels.

``randn_at(seed, ctr)`` is the draw of element counter ``ctr``: component ``ctr % 4`` of
``tl.randn4x(seed, ctr // 4)`` (four normals from one Philox block, two Box-Muller pairs),
with 64-bit block counters carried into Philox's second counter word, exactly as the C++/CUDA
header ``csrc/include/pygen/philox.h`` and ``pygen/_rng.py`` describe.
"""

import triton
import triton.language as tl


@triton.jit
def randn_at(seed, ctr):
    """Standard normal draws for int64 counters ``ctr`` under the int64 key ``seed``."""
    block = ctr >> 2
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((block >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    second = (ctr & 2) != 0
    u1 = tl.uint_to_uniform_float(tl.where(second, r2, r0))
    u2 = tl.uint_to_uniform_float(tl.where(second, r3, r1))
    n_cos, n_sin = tl.pair_uniform_to_normal(u1, u2)
    return tl.where((ctr & 1) != 0, n_sin, n_cos)
