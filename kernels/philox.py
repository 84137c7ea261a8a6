"""The Philox normal draw of every pygen backend, for Triton kernels.

``randn_at(seed, ctr)`` equals ``tl.randn(seed, ctr)`` for counters below 2**32 and
extends it to 64-bit counters by putting the high word in Philox's second counter word,
exactly as the C++/CUDA header ``csrc/include/pygen/philox.h`` does.
"""

import triton
import triton.language as tl


@triton.jit
def randn_at(seed, ctr):
    """Standard normal draws for int64 counters ``ctr`` under the int64 key ``seed``."""
    c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((ctr >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    r0, r1, _, _ = tl.philox(seed, c0, c1, zero, zero)
    u1 = tl.uint_to_uniform_float(r0)
    u2 = tl.uint_to_uniform_float(r1)
    n0, _ = tl.pair_uniform_to_normal(u1, u2)
    return n0
