"""Counter-based normal noise: the bits Triton's `tl.philox` draws, in plain PyTorch.

Every value is a pure function of (sample seed, step, stream, element index):

    key     = seed                 (key0 = low 32 bits, key1 = high 32 bits, as tl.philox)
    counter = (element // 4, step, stream, 0)
    (r0, r1, r2, r3) = Philox4x32-10(counter, key)
    u_i     = uint_to_uniform_float(r_i)                    (triton.language.random)
    (n0, n1) = BoxMuller(u0, u1),  (n2, n3) = BoxMuller(u2, u3)
    value(element) = n[element % 4]

The kernels (fastdiff.kernels.philox) draw the same bits, so CPU and GPU noise agree to
the last ulp of log/cos/sin, and a sample's noise never depends on its batch.
uint32 arithmetic is done in int64 tensors with masking; 32x32-bit products use the
wrapping int64 multiply, whose low 64 bits are the unsigned product's. On the CPU, randn runs
the same arithmetic in numpy uint64 lanes (`_normals_numpy`, 2-2.5x faster: numpy's 64-bit
multiply and shifts are cheaper than torch's, and reversed views pair the lanes for free);
tests hold it bit-equal to the torch path, which every other device runs.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .seeds import as_seeds

# Noise streams: each is an independent sequence for the same (seed, step).
STREAM_INIT = 0  # the initial x_T
STREAM_STEP = 1  # a solver's per-step noise (ancestral, SDE)
STREAM_CORRECTOR = 2  # the Langevin corrector
STREAM_FORWARD = 3  # forward noising q(x_t | x_0) (img2img, training)
STREAM_ELBO = 4  # the variational bound's draws of x_t (fastdiff.likelihood)
STREAM_ELBO_TIMESTEPS = 5  # its Monte-Carlo timesteps
STREAM_PROBE = 6  # Skilling-Hutchinson probes of the ODE log-likelihood
STREAM_DEQUANT = 7  # uniform dequantization noise of 8-bit data

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
# triton.language.random: uint_to_uniform_float's scale and Box-Muller's guard / 2*pi,
# all rounded to float32 as Triton does.
UNIFORM_SCALE = 4.6566127342e-10
U1_MIN = 1.0e-7
TWO_PI = 6.283185307179586
_CHUNK = 2**20  # counters per vectorized batch in randn
_CPU_CHUNK = 2**16  # at most this many on the CPU (numpy), where cache, not launches, sets the size
# _normals_numpy's per-round constants, lanes (c0, c2) and keys (k0, k1)
_ROUND_MULTIPLIERS = np.array([PHILOX_ROUND_A, PHILOX_ROUND_B], dtype=np.uint64)[:, None, None]
_KEY_INCREMENTS = np.array([PHILOX_KEY_A, PHILOX_KEY_B], dtype=np.uint64)[:, None, None]
_ROUNDS = np.arange(10, dtype=np.uint64)[:, None, None, None]


def _mul_hi_lo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of x * m for x in [0, 2^32) (int64) and a uint32 constant m.

    The int64 product wraps modulo 2^64 (two's complement, as CPU and GPU multipliers do),
    which keeps all 64 bits of the unsigned product: the masks below recover both halves.
    """
    p = x * m
    return (p >> 32) & MASK32, p & MASK32


def _as_u32(v, device):
    """A uint32 lane: int tensors masked; a Python int stays a Python int (it broadcasts, and
    building a tensor from it on a GPU would copy from the host, which a CUDA graph capture
    forbids) unless no argument is a tensor, where it becomes a CPU tensor."""
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=torch.int64) & MASK32
    if device is None:
        return torch.tensor(int(v) & MASK32, dtype=torch.int64)
    return int(v) & MASK32


def philox4x32(key0, key1, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32 (Salmon et al. 2011) as tl.philox computes it; returns 4 uint32 tensors.

    Arguments are ints or int tensors holding uint32 values (broadcast together); results
    are int64 tensors with values in [0, 2^32).
    """
    device = next((a.device for a in (key0, key1, c0, c1, c2, c3) if isinstance(a, torch.Tensor)), None)
    k0, k1, c0, c1, c2, c3 = (_as_u32(a, device) for a in (key0, key1, c0, c1, c2, c3))
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint_to_uniform(r: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 uniform in [0, 1), as triton's uint_to_uniform_float."""
    # bitcast to int32, x < 0 -> ~x: a value in [0, 2^31 - 1]
    x = torch.where(r >= 2**31, MASK32 - r, r)
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32).item()  # float32 product


def _f32(fn, x: torch.Tensor) -> torch.Tensor:
    # fn(x) correctly rounded to float32 (evaluated in float64): the same value on every
    # CPU and torch build, and within an ulp of any float32 library (numpy, libdevice)
    return fn(x.double()).float()


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """triton's pair_uniform_to_normal; every product rounded to float32 as Triton does."""
    u1 = torch.clamp_min(u1, torch.tensor(U1_MIN, dtype=torch.float32).item())
    th = u2 * torch.tensor(TWO_PI, dtype=torch.float32).item()  # float32 product
    r = _f32(torch.sqrt, _f32(torch.log, u1) * -2.0)
    return r * _f32(torch.cos, th), r * _f32(torch.sin, th)


def randn(
    seeds: Sequence[int] | torch.Tensor | int,
    step: int,
    stream: int,
    shape: Sequence[int] | int,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normals [B, *shape]; sample b depends only on (seeds[b], step, stream, element)."""
    if device is None:
        device = seeds.device if isinstance(seeds, torch.Tensor) else "cpu"
    device = torch.device(device)
    shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    if not (0 <= int(step) <= MASK32):
        raise ValueError(f"step must be in [0, 2**32), got {step}")
    if not (0 <= int(stream) <= MASK32):
        raise ValueError(f"stream must be in [0, 2**32), got {stream}")
    s = as_seeds(seeds, device=device, host_check=False)  # [B]; a captured loop calls this
    numel = 1
    for d in shape:
        numel *= d
    n4 = (numel + 3) // 4
    if n4 > MASK32 + 1:
        raise ValueError(f"at most 2**34 elements per sample (counter c0 is 32-bit), got {numel}")
    B = s.shape[0]
    z = torch.empty(B, n4, 4, dtype=torch.float32, device=device)
    key0 = (s & MASK32)[:, None]  # [B, 1]
    key1 = (s >> 32)[:, None]
    if device.type == "cpu":
        normals, key0, key1 = _normals_numpy, key0.numpy().astype(np.uint64), key1.numpy().astype(np.uint64)
        chunk = min(_CHUNK, _CPU_CHUNK)
    else:
        normals, chunk = _normals_torch, _CHUNK
    # chunks of counters bound the temporaries: 2^20 int64 (~8 MB each) per launch on a device,
    # 2^16 uint64 pairs (1 MB each, cache-sized) on the CPU
    rows = max(1, chunk // max(n4, 1))
    cols = min(n4, chunk)
    for b0 in range(0, B, rows):
        for i0 in range(0, n4, cols):
            i1 = min(i0 + cols, n4)
            normals(key0[b0:b0 + rows], key1[b0:b0 + rows], i0, i1, int(step), int(stream), z[b0:b0 + rows, i0:i1])
    return z.reshape(B, 4 * n4)[:, :numel].reshape(B, *shape).to(dtype)


def _normals_torch(key0: torch.Tensor, key1: torch.Tensor, i0: int, i1: int, step: int, stream: int,
                   out: torch.Tensor) -> None:
    """out [b, i1 - i0, 4] = the normals of counters (i0..i1-1, step, stream, 0) under keys [b, 1]."""
    c0 = torch.arange(i0, i1, dtype=torch.int64, device=out.device)[None, :]
    r = philox4x32(key0, key1, c0, step, stream, 0)
    n0, n1 = box_muller(uint_to_uniform(r[0]), uint_to_uniform(r[1]))
    n2, n3 = box_muller(uint_to_uniform(r[2]), uint_to_uniform(r[3]))
    out.copy_(torch.stack((n0, n1, n2, n3), dim=-1))


def _normals_numpy(key0: np.ndarray, key1: np.ndarray, i0: int, i1: int, step: int, stream: int,
                   out: torch.Tensor) -> None:
    """_normals_torch's bits (keys uint64 [b, 1], out on the CPU) in numpy uint64 lanes.

    philox4x32 holds the multiplied words (c0, c2) in X [2, b, n] and (c1, c3) in Y. A round is
    one 64-bit multiply of both lanes, whose reversed view (a free negative stride) lines each
    high half up with the word it is xor-ed with; Y is the last product itself, reversed, whose
    low halves are the new (c1, c3) (the high halves are masked off after the xor). Then
    uint_to_uniform and box_muller as there: log, cos and sin in torch float64 rounded to
    float32 (_f32), and sqrt in float32, which numpy rounds correctly: equal to
    _f32(torch.sqrt) (checked for every float32 in [0, 33], the range of -2 log(u) here).
    """
    mask = np.uint64(MASK32)
    X = np.empty((2, key0.shape[0], i1 - i0), dtype=np.uint64)
    X[0], X[1] = np.arange(i0, i1, dtype=np.uint64), stream
    Y = np.array([step, 0], dtype=np.uint64)[:, None, None]
    round_keys = (np.stack((key0, key1)) + _ROUNDS * _KEY_INCREMENTS) & mask  # [10, 2, b, 1]: (k0, k1) per round
    # the keys' xor broadcasts along the counters, which torch does ~2.5x faster than numpy: int64 views
    X_int, round_keys = torch.from_numpy(X.view(np.int64)), torch.from_numpy(round_keys.view(np.int64))
    products = (np.empty_like(X), np.empty_like(X))
    for r in range(10):
        p = np.multiply(X, _ROUND_MULTIPLIERS, out=products[r % 2])  # (c0 * A, c2 * B), exact
        np.right_shift(p[::-1], np.uint64(32), out=X)  # (hi(c2 * B), hi(c0 * A))
        X ^= Y
        X &= mask
        X_int.bitwise_xor_(round_keys[r])  # X = (c0, c2) of the next round
        Y = p[::-1]  # (c1, c3) = (lo(c2 * B), lo(c0 * A)) in the low halves
    u1 = np.maximum(_uniform_numpy(X), np.float32(U1_MIN))  # lanes of (u0, u2)
    th = _uniform_numpy(Y) * np.float32(TWO_PI)  # lanes of (u1, u3), times 2 pi in float32
    radius = _f32(torch.log, torch.from_numpy(u1)).numpy() * np.float32(-2.0)
    np.sqrt(radius, out=radius)
    th = torch.from_numpy(th).double()
    lanes = out.numpy().transpose(2, 0, 1)  # [4, b, n]: (n0, n1, n2, n3) = (r cos, r sin) of each pair
    np.multiply(radius, th.cos().float().numpy(), out=lanes[0::2])
    np.multiply(radius, th.sin_().float().numpy(), out=lanes[1::2])


def _uniform_numpy(words: np.ndarray) -> np.ndarray:
    """uint_to_uniform of the low 32 bits of uint64 words: bitcast to int32, x < 0 -> ~x."""
    x = words.astype(np.uint32).view(np.int32)
    x ^= x >> 31
    u = x.astype(np.float32)
    u *= np.float32(UNIFORM_SCALE)
    return u


def randint(seeds: Sequence[int] | torch.Tensor | int, step: int, stream: int, count: int, high: int, *,
            device=None) -> torch.Tensor:
    """Uniform integers in [0, high), int64 [B, count]; value k of sample b depends only on
    (seeds[b], step, stream, k): counter (k, step, stream, 0), value (r0 * 2^32 + r1) mod high
    (its bias from uniform is below high / 2^64)."""
    if not isinstance(high, int) or not 1 <= high < 2**31:
        raise ValueError(f"high must be an integer in [1, 2**31), got {high!r}")
    if not isinstance(count, int) or count < 0 or count > MASK32 + 1:
        raise ValueError(f"count must be an integer in [0, 2**32], got {count!r}")
    if device is None:
        device = seeds.device if isinstance(seeds, torch.Tensor) else "cpu"
    s = as_seeds(seeds, device=torch.device(device), host_check=False)
    c0 = torch.arange(count, dtype=torch.int64, device=s.device)[None, :]
    r0, r1, _, _ = philox4x32((s & MASK32)[:, None], (s >> 32)[:, None], c0, int(step), int(stream), 0)
    # (r0 * 2^32 + r1) mod high without leaving int64: every product stays below 2^62
    return ((r0 % high) * ((MASK32 + 1) % high) + r1) % high
