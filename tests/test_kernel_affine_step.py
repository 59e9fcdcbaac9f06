"""fastdiff.kernels.affine_step against a plain-torch reference of its contract."""
import pytest
import torch

from fastdiff import rng
from fastdiff.kernels import affine_step
from fastdiff.rng import STREAM_STEP
from fastdiff.solvers.table import NCOL, Z

ROW_WIDTH = 3 + 3 * NCOL
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 9), (2, 4, 33, 17)]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def reference_step(row, coef, x, out, *, point=None, history=(), push_dest=None, model_in=None,
                   cfg_w=None, seeds, clip=None, thresh=None, out_scale=None,
                   noise=True, noise_counter=None):
    """The contract in float64 torch; returns the expected buffers (name -> tensor)."""
    B, S = x.shape[0], x.shape[1:]
    per = lambda v: v.double().view(B, *([1] * len(S)))  # noqa: E731  [B] -> [B, 1, ...]
    c = coef[row].double()
    d_point, d_out, c_in, state, point_row, push_row = c[0], c[1], c[2], c[3:3 + NCOL], c[3 + NCOL:3 + 2 * NCOL], \
        c[3 + 2 * NCOL:]
    xd = x.double()
    p = point.double() if point is not None else None
    p_in = p if p is not None else xd
    o = out[:B].double()
    if out.shape[0] == 2 * B:
        o = o + per(cfg_w) * (out[B:].double() - o)
    if out_scale is not None:
        o = o * per(out_scale)
    d_raw = d_point * p_in + d_out * o
    d = d_raw
    if clip is not None:
        d = d_raw.clamp(-clip, clip)
    if thresh is not None:
        s = per(thresh)
        d = torch.maximum(torch.minimum(d_raw, s), -s) / s
    counter = row if noise_counter is None else noise_counter
    z = rng.randn(seeds, counter, STREAM_STEP, S).double() if noise else torch.zeros_like(xd)
    # V = [x, P, D, D_raw, H0, H1, H2, z]: P the point the model saw (x without one)
    V = [xd, p_in, d, d_raw] + [h.double() for h in history] + [torch.zeros_like(xd)] * (3 - len(history)) + [z]
    x_next = sum(state[j] * V[j] for j in range(NCOL))
    p_next = sum(point_row[j] * V[j] for j in range(NCOL)) if point is not None else x_next
    want = {"x": x_next}
    if point is not None:
        want["point"] = p_next
    if push_dest is not None:  # an affine combination of the row's vector (D for most solvers)
        want["push_dest"] = sum(push_row[j] * V[j] for j in range(NCOL))
    if model_in is not None:
        m = c_in * p_next
        want["model_in"] = torch.cat([m, m]) if model_in.shape[0] == 2 * B else m
    return want


def _assert_close(name, got, want, dtype=torch.float32):
    rtol, atol = TOL[dtype]
    want = want.to(got.dtype).double() if dtype != torch.float32 else want
    got = got.double()
    bad = ~((got - want).abs() <= atol + rtol * want.abs())
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        pytest.fail(f"{name}: {int(bad.sum())}/{bad.numel()} mismatches, first at {idx}: "
                    f"{got[bad][:5].tolist()} vs {want[bad][:5].tolist()}")


def _coef(rows=3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    coef = torch.randn(rows, ROW_WIDTH, generator=g)
    return coef.to(device)


def run_case(device, shape, *, cfg=False, K=0, push=None, point=False, noise=True, clip=None,
             thresh=False, out_scale=False, model_in_dtype=None, out_dtype=torch.float32,
             row=1, seed=0, model_in_half=False, noise_counter=None):
    """Build random inputs, run kernel and reference, compare every written buffer."""
    g = torch.Generator().manual_seed(seed)
    B, S = shape[0], shape[1:]
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    coef = _coef(seed=seed + 1)
    x = randn(B, *S)
    out = randn((2 if cfg else 1) * B, *S).to(out_dtype)
    history = [randn(B, *S) for _ in range(K)]
    args = dict(
        point=randn(B, *S) if point else None,
        history=history,
        push_dest=None if push is None else (history[push] if push >= 0 else torch.empty(B, *S)),
        # model_in_half: a [2B] output, the next row unguided (the conditional half [B] only)
        model_in=None if model_in_dtype is None else torch.empty((2 if cfg and not model_in_half else 1) * B, *S,
                                                                 dtype=model_in_dtype),
        cfg_w=(1 + 4 * torch.rand(B, generator=g)) if cfg else None,
        seeds=torch.randint(0, 2**62, (B,), generator=g),
        clip=clip,
        thresh=(1 + torch.rand(B, generator=g)) if thresh else None,
        out_scale=(0.5 + torch.rand(B, generator=g)) if out_scale else None,
        noise=noise,
        noise_counter=noise_counter,
    )
    want = reference_step(row, coef, x, out, **args)

    # to the kernel device; outputs poisoned so that an unwritten element fails
    dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    kx, kout, kcoef = dev(x), dev(out), dev(coef)
    kargs = {k: dev(v) for k, v in args.items() if k != "history"}
    kargs["history"] = [dev(h) for h in history]
    if push is not None:
        kargs["push_dest"] = kargs["history"][push] if push >= 0 else dev(args["push_dest"])
        if push < 0:
            kargs["push_dest"].fill_(float("nan"))
    if kargs["model_in"] is not None:
        kargs["model_in"].fill_(float("nan"))
    affine_step(row, kcoef, kx, kout, **kargs)

    _assert_close("x", kx.cpu(), want["x"])
    if point:
        _assert_close("point", kargs["point"].cpu(), want["point"])
    if push is not None:
        _assert_close("push_dest", kargs["push_dest"].cpu(), want["push_dest"])
    if model_in_dtype is not None:
        _assert_close("model_in", kargs["model_in"].cpu(), want["model_in"], model_in_dtype)
    # inputs that must stay untouched
    assert torch.equal(kout.cpu(), out)
    for k, h in enumerate(history):
        if k != push:
            assert torch.equal(kargs["history"][k].cpu(), h)


CONFIGS = {
    "plain": dict(),
    "cfg_hist1_push_new": dict(cfg=True, K=1, push=-1, model_in_dtype=torch.float32),
    "hist2_push_alias_clip": dict(K=2, push=1, clip=1.0, model_in_dtype=torch.float32),
    "hist3_alias_point_thresh": dict(K=3, push=2, point=True, thresh=True, model_in_dtype=torch.float32),
    "cfg_point_scale_nonoise": dict(cfg=True, point=True, out_scale=True, noise=False,
                                    model_in_dtype=torch.float32),
    # guidance interval: guided row, unguided next (model_in is the [B] conditional half)
    "cfg_model_in_half": dict(cfg=True, K=1, push=0, model_in_dtype=torch.float32, model_in_half=True),
    # churn: z keyed by the next row's counter (StepTable.noise_ahead)
    "noise_ahead_point": dict(point=True, K=1, noise_counter=2, model_in_dtype=torch.float32),
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference(kernel_device, shape, config):
    run_case(kernel_device, shape, **CONFIGS[config])


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("model_in_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
def test_model_dtypes(kernel_device, out_dtype, model_in_dtype, cfg):
    run_case(kernel_device, (3, 5, 7, 9), cfg=cfg, out_dtype=out_dtype, model_in_dtype=model_in_dtype,
             K=1, push=0, seed=3)


def test_more_samples_than_a_grid_axis_holds(kernel_device):
    """B = 65541 > 65535 (a GPU grid's axes 1-2) samples of 3 elements: the tiles of samples
    past 65535 (int64 offsets, per-sample seeds, CFG weights, thresholds) equal the reference."""
    run_case(kernel_device, (65541, 3), cfg=True, K=1, push=0, thresh=True, model_in_dtype=torch.float16, seed=5)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_noise_is_rng(kernel_device, shape):
    """A row x_next = z: the kernel's noise is fastdiff.rng's (up to float32 log/cos ulps)."""
    B, S = shape[0], shape[1:]
    row = 2
    coef = torch.zeros(4, ROW_WIDTH)
    coef[row, 3 + Z] = 1.0
    seeds = torch.tensor([2**63 - 1, 0, 12345][:B], dtype=torch.int64)
    x = torch.zeros(shape, device=kernel_device)  # read with coefficient 0, so not NaN-poisoned
    out = torch.zeros(shape, device=kernel_device)
    affine_step(row, coef.to(kernel_device), x, out, seeds=seeds.to(kernel_device))
    want = rng.randn(seeds, row, STREAM_STEP, S)
    got = x.cpu()
    ulps = (got.view(torch.int32).long() - want.view(torch.int32).long()).abs()
    ok = (ulps <= 4) | ((got - want).abs() <= 1e-6)
    assert bool(ok.all()), f"{int((~ok).sum())} normals differ: {got[~ok][:5]} vs {want[~ok][:5]}"
    # and the draw is per sample: sample 1 alone gives the same values
    x1 = torch.zeros((1, *S), device=kernel_device)
    affine_step(row, coef.to(kernel_device), x1, out[:1].clone(), seeds=seeds[1:2].to(kernel_device))
    assert torch.equal(x1.cpu()[0], got[1])


def test_rows_share_one_kernel(kernel_device):
    """Every row of a table runs through the same launcher; rows differ only in coefficients."""
    for row in range(3):
        run_case(kernel_device, (1, 1, 1, 1), row=row, cfg=True, model_in_dtype=torch.float32, seed=row)


def test_validation(kernel_device):
    d = kernel_device
    x = torch.zeros(2, 3, device=d)
    coef = torch.zeros(2, ROW_WIDTH, device=d)
    seeds = torch.zeros(2, dtype=torch.int64, device=d)
    ok = dict(seeds=seeds)
    with pytest.raises(ValueError, match="row"):
        affine_step(2, coef, x, torch.zeros(2, 3, device=d), **ok)
    with pytest.raises(ValueError, match="cfg_w"):
        affine_step(0, coef, x, torch.zeros(4, 3, device=d), **ok)
    with pytest.raises(ValueError, match="out"):
        affine_step(0, coef, x, torch.zeros(3, 3, device=d), **ok)
    with pytest.raises(ValueError, match="x must be a float32"):
        affine_step(0, coef, x.half(), torch.zeros(2, 3, device=d), **ok)
    with pytest.raises(ValueError, match="coef"):
        affine_step(0, coef.double(), x, torch.zeros(2, 3, device=d), **ok)
    with pytest.raises(ValueError, match="contiguous"):
        affine_step(0, coef, torch.zeros(3, 2, device=d).t(), torch.zeros(2, 3, device=d), **ok)
    with pytest.raises(ValueError, match="history"):
        affine_step(0, coef, x, torch.zeros(2, 3, device=d), history=[x.clone()] * 4, **ok)
    with pytest.raises(ValueError, match="seeds"):
        affine_step(0, coef, x, torch.zeros(2, 3, device=d), seeds=seeds.int())
    with pytest.raises(ValueError, match="exclusive"):
        affine_step(0, coef, x, torch.zeros(2, 3, device=d), clip=1.0,
                    thresh=torch.ones(2, device=d), **ok)
    with pytest.raises(ValueError, match="model_in"):
        affine_step(0, coef, x, torch.zeros(2, 3, device=d), model_in=torch.zeros(2, 4, device=d), **ok)


@pytest.mark.cuda
def test_gpu_step_matches_reference_at_scale():
    """On the GPU (compiled, not interpreted) at a latent size, CFG + history + noise + fp16.

    Triton's GPU log/cos/sin are fast approximations, so a few normals may differ from
    fastdiff.rng by more than float32 ulps (where Box-Muller's radius is near 0)."""
    B, S = 4, (4, 64, 64)
    g = torch.Generator().manual_seed(0)
    coef = _coef(seed=5)
    x, point = torch.randn(B, *S, generator=g), torch.randn(B, *S, generator=g)
    out = torch.randn(2 * B, *S, generator=g).half()
    hist = [torch.randn(B, *S, generator=g) for _ in range(3)]
    args = dict(point=point, history=hist, push_dest=hist[2], cfg_w=torch.full((B,), 7.5),
                seeds=torch.arange(B) * 977, model_in=torch.empty(2 * B, *S, dtype=torch.float16))
    want = reference_step(1, coef, x, out, **args)
    cu = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    cu["history"] = [h.cuda() for h in hist]
    cu["push_dest"] = cu["history"][2]
    kx = x.cuda()
    affine_step(1, coef.cuda(), kx, out.cuda(), **cu)
    torch.cuda.synchronize()
    for name, got in (("x", kx), ("point", cu["point"]), ("push_dest", cu["push_dest"])):
        err = (got.cpu().double() - want[name]).abs() / (1 + want[name].abs())
        assert float((err > 1e-5).float().mean()) < 1e-4 and float(err.max()) < 1e-2, name
    _assert_close("model_in", cu["model_in"].cpu(), want["model_in"], torch.float16)
