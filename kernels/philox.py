"""In-kernel normal noise with fastdiff.rng's layout (shared by the kernels).

    key = seed (uint64: tl.philox splits it into low/high 32 bits)
    counter = (element // 4, step, stream, 0)
    (n0, n1, n2, n3) = BoxMuller(uniform(philox(key, counter)))   (triton.language.random)
    z[element] = n[element % 4]

`normal_block` draws BLOCK normals for the contiguous elements [start, start + BLOCK) of
ROWS samples with BLOCK // 4 Philox calls per sample: the four results are interleaved back with tl.join + tl.reshape
(the 4-normals-per-call pattern that makes noise free on bandwidth-bound kernels).
"""
import triton
import triton.language as tl


@triton.jit
def normal4(seed, c0, step, stream):
    """4 standard normals per counter c0 (uint32 block): the elements 4*c0 + 0..3."""
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, (zero + step).to(tl.uint32), (zero + stream).to(tl.uint32), zero)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    return n0, n1, n2, n3


@triton.jit
def normal_block(seed, start, step, stream, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Normals for elements start + [0, BLOCK) (start a multiple of 4, int64) of ROWS samples
    with seeds `seed` [ROWS, 1]: [ROWS, BLOCK] float32."""
    c0 = tl.broadcast_to((start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)[None, :], (ROWS, BLOCK // 4))
    n0, n1, n2, n3 = normal4(tl.broadcast_to(seed, (ROWS, BLOCK // 4)), c0, step, stream)
    # z[r, i, j, k] = n_{2j+k}[r, i]: row-major flattening puts n_m[r, i] at element 4*i + m
    z = tl.join(tl.join(n0, n2), tl.join(n1, n3))  # [ROWS, BLOCK//4, 2, 2]
    return tl.reshape(z, (ROWS, BLOCK))
