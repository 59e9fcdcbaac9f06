"""fastdiff.rng: Philox4x32-10 known answers, bit equality with Triton, batch invariance."""
import pytest
import torch
import triton
import triton.language as tl

from fastdiff import rng
from fastdiff.rng import STREAM_CORRECTOR, STREAM_FORWARD, STREAM_INIT, STREAM_STEP

M32 = 0xFFFFFFFF


# Random123's kat_vectors for philox4x32_10: (counter c0..c3, key k0 k1) -> output
@pytest.mark.parametrize(
    "ctr, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((M32,) * 4, (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    out = rng.philox4x32(key[0], key[1], *ctr)
    assert tuple(int(v) for v in out) == expected


@triton.jit
def _triton_philox_kernel(seed_ptr, bits_ptr, normal_ptr, n4, step, stream, BLOCK: tl.constexpr):
    # Triton's own generator and conversions: bits [B, 4, n4], normals [B, 4, n4]
    b = tl.program_id(0)
    seed = tl.load(seed_ptr + b)
    i = tl.arange(0, BLOCK)
    mask = i < n4
    c0 = i.to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, (zero + step).to(tl.uint32), (zero + stream).to(tl.uint32), zero)
    u0, u1 = tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1)
    u2, u3 = tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3)
    n0, n1 = tl.pair_uniform_to_normal(u0, u1)
    n2, n3 = tl.pair_uniform_to_normal(u2, u3)
    base = b * 4 * n4
    tl.store(bits_ptr + base + i, r0.to(tl.int64), mask=mask)
    tl.store(bits_ptr + base + n4 + i, r1.to(tl.int64), mask=mask)
    tl.store(bits_ptr + base + 2 * n4 + i, r2.to(tl.int64), mask=mask)
    tl.store(bits_ptr + base + 3 * n4 + i, r3.to(tl.int64), mask=mask)
    tl.store(normal_ptr + base + i, n0, mask=mask)
    tl.store(normal_ptr + base + n4 + i, n1, mask=mask)
    tl.store(normal_ptr + base + 2 * n4 + i, n2, mask=mask)
    tl.store(normal_ptr + base + 3 * n4 + i, n3, mask=mask)


@triton.jit
def _triton_randn4x_kernel(seed, out_ptr, n4, BLOCK: tl.constexpr):
    # tl.randn4x(seed, offset): counter (offset, 0, 0, 0), i.e. step 0, stream 0
    i = tl.arange(0, BLOCK)
    mask = i < n4
    n0, n1, n2, n3 = tl.randn4x(seed, i)
    tl.store(out_ptr + 4 * i, n0, mask=mask)
    tl.store(out_ptr + 4 * i + 1, n1, mask=mask)
    tl.store(out_ptr + 4 * i + 2, n2, mask=mask)
    tl.store(out_ptr + 4 * i + 3, n3, mask=mask)


def _assert_normals_equal(got, want, max_ulp=4):
    """Same normals up to the last ulps of float32 log/cos/sin (rng rounds float64 values;
    the interpreter uses numpy's float32 functions): at most max_ulp apart, or 1e-6 near 0."""
    ulps = (got.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    close = (ulps <= max_ulp) | ((got - want).abs() <= 1e-6)
    if not bool(close.all()):
        bad = (~close).nonzero()[:5].tolist()
        pytest.fail(f"normals differ at {bad}: {got[~close][:5].tolist()} vs {want[~close][:5].tolist()}")


SEEDS = [0, 1, 12345, 2**32 - 1, 2**32, 0x0123456789ABCDEF, 2**63 - 1]


@pytest.mark.parametrize("step, stream", [(0, STREAM_INIT), (7, STREAM_STEP), (2**32 - 1, STREAM_FORWARD)])
def test_matches_triton_philox(kernel_device, step, stream):
    n4, B = 37, len(SEEDS)
    seeds = torch.tensor(SEEDS, dtype=torch.int64, device=kernel_device)
    bits = torch.full((B, 4, n4), -1, dtype=torch.int64, device=kernel_device)
    normals = torch.full((B, 4, n4), float("nan"), device=kernel_device)
    _triton_philox_kernel[(B,)](seeds, bits, normals, n4, step, stream, BLOCK=64)

    key0, key1 = (seeds & M32)[:, None], (seeds >> 32)[:, None]
    c0 = torch.arange(n4, device=kernel_device)[None, :]
    want_bits = torch.stack(rng.philox4x32(key0, key1, c0, step, stream, 0), dim=1)
    assert torch.equal(bits.cpu(), want_bits.cpu())

    z = rng.randn(seeds, step, stream, (4 * n4,), device=kernel_device)  # [B, 4*n4]
    _assert_normals_equal(z.cpu(), normals.transpose(1, 2).reshape(B, 4 * n4).cpu())


def test_matches_triton_randn4x(kernel_device):
    n4, seed = 50, 0xDEADBEEF12
    out = torch.full((4 * n4,), float("nan"), device=kernel_device)
    _triton_randn4x_kernel[(1,)](seed, out, n4, BLOCK=64)
    _assert_normals_equal(rng.randn([seed], 0, 0, 4 * n4)[0], out.cpu())


@triton.jit
def _triton_uniform_kernel(bits_ptr, u_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    r = tl.load(bits_ptr + i, mask=mask).to(tl.uint32)
    tl.store(u_ptr + i, tl.uint_to_uniform_float(r), mask=mask)


def test_uniforms_bit_equal_triton(kernel_device):
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([0, 1, 2**24 + 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2**8, M32])
    bits = torch.cat([torch.randint(0, 2**32, (4000,), generator=g), edges])
    u = torch.full(bits.shape, float("nan"), device=kernel_device)
    _triton_uniform_kernel[(1,)](bits.to(kernel_device), u, bits.shape[0], BLOCK=4096)
    assert torch.equal(u.cpu(), rng.uint_to_uniform(bits))


def test_uniform_conversion_edges():
    r = torch.tensor([0, 1, 2**31 - 1, 2**31, M32], dtype=torch.int64)
    u = rng.uint_to_uniform(r)
    assert bool((u >= 0).all()) and bool((u < 1).all())
    assert u[0] == 0 and u[-1] == 0  # 0xffffffff bitcasts to -1, ~(-1) = 0
    assert u[2] == u[3]  # 2^31 - 1 and 2^31 (= ~(2^31 - 1) as int32) meet


def test_batch_invariance():
    seeds = [3, 99, 2**40 + 1, 7]
    z = rng.randn(seeds, 5, STREAM_STEP, (3, 5, 7))
    assert z.shape == (4, 3, 5, 7)
    for b, s in enumerate(seeds):
        assert torch.equal(z[b], rng.randn(s, 5, STREAM_STEP, (3, 5, 7))[0])
    # reversed order, inside a larger batch
    z2 = rng.randn(torch.tensor([11] + seeds[::-1]), 5, STREAM_STEP, (3, 5, 7))
    assert torch.equal(z2[1:], z.flip(0))


def test_prefix_invariance():
    # element e's value does not depend on the total size (nor on the shape)
    a = rng.randn([42], 2, STREAM_STEP, (2, 3, 5))
    b = rng.randn([42], 2, STREAM_STEP, 101)
    assert torch.equal(a.reshape(-1), b[0, :30])


def test_streams_steps_seeds_differ():
    base = rng.randn([1], 0, STREAM_STEP, 4096)
    for other in (
        rng.randn([1], 1, STREAM_STEP, 4096),
        rng.randn([1], 0, STREAM_CORRECTOR, 4096),
        rng.randn([2], 0, STREAM_STEP, 4096),
        rng.randn([1 + 2**32], 0, STREAM_STEP, 4096),
    ):
        assert float((base == other).float().mean()) < 0.01
        corr = torch.corrcoef(torch.stack((base[0], other[0])))[0, 1]
        assert abs(float(corr)) < 0.08


def test_moments():
    z = rng.randn(list(range(4)), 3, STREAM_INIT, 2**16).double()
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1) < 0.01
    assert abs(float((z**3).mean())) < 0.03
    assert abs(float((z**4).mean()) - 3) < 0.06
    assert bool(torch.isfinite(z).all())


def test_dtype_device_and_validation():
    z = rng.randn(torch.tensor([5]), 0, 0, (2, 2), dtype=torch.float16)
    assert z.dtype == torch.float16 and z.device.type == "cpu"
    assert torch.equal(z, rng.randn([5], 0, 0, (2, 2)).half())
    with pytest.raises(ValueError):
        rng.randn([-1], 0, 0, 4)
    with pytest.raises(ValueError):
        rng.randn([2**63], 0, 0, 4)
    with pytest.raises(ValueError):
        rng.randn([1], -1, 0, 4)
    with pytest.raises(ValueError, match="seeds must be integers"):
        rng.randn(torch.tensor([1.0]), 0, 0, 4)


def test_chunking_is_invisible(monkeypatch):
    whole = rng.randn([4, 5, 6], 1, STREAM_STEP, (3, 37))
    monkeypatch.setattr(rng, "_CHUNK", 8)  # splits both the batch and the counters
    assert torch.equal(rng.randn([4, 5, 6], 1, STREAM_STEP, (3, 37)), whole)
    monkeypatch.setattr(rng, "_CHUNK", 64)  # whole rows, several per chunk
    assert torch.equal(rng.randn([4, 5, 6], 1, STREAM_STEP, (3, 37)), whole)


def test_cpu_numpy_path_equals_torch_path():
    """randn's CPU path (numpy uint64 lanes) gives the torch path's bits (which other devices run):
    keys with high bits set, counters up to 2^32 - 1, any step and stream, odd sizes."""
    g = torch.Generator().manual_seed(3)
    seeds = torch.cat([torch.tensor(SEEDS), torch.randint(0, 2**63 - 1, (5,), generator=g)])
    key0, key1 = (seeds & M32)[:, None], (seeds >> 32)[:, None]
    cases = [(0, 37, 0, STREAM_INIT), (1000, 1301, 2**32 - 1, 7), (M32 - 40, M32 + 1, 12345, 2**31)]
    for i0, i1, step, stream in cases:
        want = torch.empty(len(seeds), i1 - i0, 4)
        got = torch.full_like(want, float("nan"))
        rng._normals_torch(key0, key1, i0, i1, step, stream, want)
        rng._normals_numpy(key0.numpy().astype("uint64"), key1.numpy().astype("uint64"), i0, i1, step, stream, got)
        assert torch.equal(got, want), (i0, step, stream)


@pytest.mark.cuda
def test_cuda_equals_cpu():
    seeds = torch.tensor(SEEDS)
    cpu = rng.randn(seeds, 3, STREAM_STEP, (4, 32, 32))
    gpu = rng.randn(seeds.cuda(), 3, STREAM_STEP, (4, 32, 32)).cpu()
    _assert_normals_equal(gpu, cpu, max_ulp=1)


def test_randn_builds_no_tensor_from_host_values_on_the_target_device(monkeypatch):
    """Inside a captured CUDA graph, torch.tensor(value, device=gpu) is a host-to-device copy,
    which capture forbids: the noise must pass step and stream as Python ints."""
    real, placed = torch.tensor, []

    def spy(*args, **kwargs):
        if kwargs.get("device") is not None:
            placed.append((args, kwargs))
        return real(*args, **kwargs)

    seeds = torch.tensor([3, 4])
    want = rng.randn(seeds, 5, STREAM_STEP, (3, 5))
    monkeypatch.setattr(torch, "tensor", spy)
    got = rng.randn(seeds, 5, STREAM_STEP, (3, 5), device="cpu")
    assert placed == [] and torch.equal(got, want)
