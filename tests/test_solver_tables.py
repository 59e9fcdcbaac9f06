"""Every solver's float64 coefficient table agrees with its textbook step to 1e-10.

The table is executed row by row in float64 with a fixed, nonlinear test denoiser; the
textbook chain calls each solver file's `reference_*` functions with the same denoiser and
the same noise.  Both walk the same grid, so any coefficient error shows up.
"""
import math

import pytest
import torch

from fastdiff import Schedule, make_grid
from fastdiff.solvers import STRIDE_PREV, build_table, ddim, ddpm, dpmpp, euler, langevin, unipc
from fastdiff.solvers.base import conversion
from fastdiff import rng
from fastdiff.executors import TorchExecutor
from fastdiff.guidance import Thresholding
from fastdiff.loop import LoopBuffers
from fastdiff.rng import STREAM_STEP
from fastdiff.solvers.table import COLUMNS, StepTable, history_slots

F64 = torch.float64
SHAPE = (3, 5, 7)


def denoiser(x_vp: torch.Tensor, abar: float) -> torch.Tensor:
    """A smooth, nonlinear stand-in for a trained D(x_t, t)."""
    a = math.sqrt(abar)
    return torch.tanh(0.8 * x_vp / (a + 0.3)) + 0.1 * math.sin(3 * abar)


def run_table(table, x0, noises):
    """Execute a StepTable in float64 with `denoiser`; returns the final state."""
    R = table.rows
    x = x0.clone()
    point = x0.clone()
    K = max(table.history_len, 1)
    history = [torch.zeros_like(x0) for _ in range(K)]
    layout = history_slots(table)
    for r in range(R):
        s = float(table.sigma[r])
        abar = 1.0 / (1.0 + s * s)
        p = point if table.point is not None else x
        to_vp = math.sqrt(abar) if table.space == "ve" else 1.0
        Dv = denoiser(to_vp * p, abar)
        slots, dest = layout[r]
        V = [x, p, Dv, Dv] + [history[k] for k in slots] + [torch.zeros_like(x0)] * (3 - len(slots)) + [noises[r]]
        x_next = sum(c * v for c, v in zip(table.state[r].tolist(), V))
        p_next = sum(c * v for c, v in zip(table.point[r].tolist(), V)) if table.point is not None else x_next
        if dest is not None:
            history[dest] = Dv.clone()
        x, point = x_next, p_next
    return x


def draws(seed, rows):
    """x0 [SHAPE] and one noise per row, drawn in that order after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torch.randn(SHAPE, dtype=F64), torch.randn(rows, *SHAPE, dtype=F64)


def grid_for(solver, steps=12, spacing="trailing", sigmas=None, schedule=None):
    schedule = schedule or Schedule.linear()
    return make_grid(schedule, steps, spacing=spacing, sigmas=sigmas,
                     stride_prev=solver in STRIDE_PREV and sigmas is None)


def vp(abar):
    return math.sqrt(abar), math.sqrt(1 - abar)


GRIDS = [dict(spacing="trailing"), dict(spacing="leading"), dict(spacing="linspace"), dict(sigmas="karras")]


@pytest.mark.parametrize("g", GRIDS, ids=lambda g: "-".join(str(v) for v in g.values()))
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_table_matches_posterior(g, variance):
    grid = grid_for("ddpm", **g)
    table = build_table("ddpm", grid, "epsilon", variance=variance)
    x0, noises = draws(0, table.rows)
    x = x0.clone()
    for i in range(grid.steps):
        a_t, a_prev = float(grid.abar[i]), float(grid.abar_to[i])
        x = ddpm.reference_step(x, denoiser(x, a_t), noises[i], a_t, a_prev, variance, add_noise=float(grid.t[i]) > 0)
    torch.testing.assert_close(run_table(table, x0, noises), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("g", GRIDS, ids=lambda g: "-".join(str(v) for v in g.values()))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_table_matches_eq12(g, eta):
    grid = grid_for("ddim", **g)
    table = build_table("ddim", grid, "epsilon", eta=eta)
    x0, noises = draws(1, table.rows)
    x = x0.clone()
    for i in range(grid.steps):
        a_t, a_prev = float(grid.abar[i]), float(grid.abar_to[i])
        D0 = denoiser(x, a_t)
        eps = (x - math.sqrt(a_t) * D0) / math.sqrt(1 - a_t)
        x = ddim.reference_step(x, D0, eps, noises[i] if eta > 0 else 0 * x, a_t, a_prev, eta)
    torch.testing.assert_close(run_table(table, x0, noises), x, rtol=1e-10, atol=1e-10)


def _ve_chain(grid, x0, noises, step):
    x = x0.clone()
    for i in range(grid.steps):
        s, s_to = float(grid.sigma[i]), float(grid.sigma_to[i])
        D0 = denoiser(x / math.sqrt(1 + s * s), 1 / (1 + s * s))
        x = step(x, D0, noises[i], s, s_to)
    return x


@pytest.mark.parametrize("g", GRIDS, ids=lambda g: "-".join(str(v) for v in g.values()))
def test_euler_tables_match_karras(g):
    grid = grid_for("euler", **g)
    x0, noises = draws(2, grid.steps)
    want = _ve_chain(grid, x0, noises, lambda x, D0, z, s, s_to: euler.reference_euler(x, D0, s, s_to))
    torch.testing.assert_close(run_table(build_table("euler", grid, "epsilon"), x0, noises), want,
                               rtol=1e-10, atol=1e-10)
    want = _ve_chain(grid, x0, noises, euler.reference_euler_ancestral)
    torch.testing.assert_close(run_table(build_table("euler_ancestral", grid, "epsilon"), x0, noises), want,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("g", GRIDS, ids=lambda g: "-".join(str(v) for v in g.values()))
def test_heun_table_matches_algorithm_1(g):
    grid = grid_for("heun", **g)
    table = build_table("heun", grid, "epsilon")
    assert table.rows == 2 * grid.steps - 1  # the last step is a single Euler evaluation
    torch.manual_seed(3)
    x0 = torch.randn(SHAPE, dtype=F64)
    x = x0.clone()
    den = lambda y, s: denoiser(y / math.sqrt(1 + s * s), 1 / (1 + s * s))  # noqa: E731
    for i in range(grid.steps):
        x = euler.reference_heun(x, den, float(grid.sigma[i]), float(grid.sigma_to[i]))
    noises = torch.zeros(table.rows, *SHAPE, dtype=F64)
    torch.testing.assert_close(run_table(table, x0, noises), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("g", GRIDS, ids=lambda g: "-".join(str(v) for v in g.values()))
@pytest.mark.parametrize("sde", [False, True])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpmpp_tables_match_algorithm_2(g, sde, lower_order_final):
    grid = grid_for("dpmpp_2m", **g)
    name = "dpmpp_2m_sde" if sde else "dpmpp_2m"
    table = build_table(name, grid, "epsilon", lower_order_final=lower_order_final)
    x0, noises = draws(4, table.rows)
    x, D_prev, lam_prev = x0.clone(), None, None
    N = grid.steps
    for i in range(N):
        a_s, a_t = float(grid.abar[i]), float(grid.abar_to[i])
        (alpha_s, sigma_s), (alpha_t, sigma_t) = vp(a_s), vp(a_t)
        D0 = denoiser(x, a_s)
        if sigma_t == 0:  # landing on the data: x = alpha_t D (first order, lambda = inf)
            x = alpha_t * D0
            break
        last_first_order = i == N - 1 and dpmpp.final_step_first_order(N, lower_order_final)
        prev = None if last_first_order else D_prev
        if sde:
            x = dpmpp.reference_2m_sde(x, D0, prev, noises[i], alpha_s, sigma_s, alpha_t, sigma_t, lam_prev)
        else:
            x = dpmpp.reference_2m(x, D0, prev, alpha_s, sigma_s, alpha_t, sigma_t, lam_prev)
        D_prev, lam_prev = D0, math.log(alpha_s / sigma_s)
    torch.testing.assert_close(run_table(table, x0, noises), x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("g", GRIDS, ids=lambda g: "-".join(str(v) for v in g.values()))
@pytest.mark.parametrize("steps", [1, 2, 3, 12])
def test_unipc_table_matches_algorithms_1_2(g, steps):
    grid = grid_for("unipc", steps=steps, **g)
    table = build_table("unipc", grid, "epsilon")
    torch.manual_seed(5)
    x0 = torch.randn(SHAPE, dtype=F64)
    N = grid.steps
    levels = [float(a) for a in grid.abar] + [float(grid.abar_to[-1])]
    lam = [math.log(math.sqrt(a) / math.sqrt(1 - a)) if a < 1 else math.inf for a in levels]
    # step 0: evaluate at x0, then predict (first order)
    m = [denoiser(x0, levels[0])]
    x_c = x0.clone()
    a1, s1 = vp(levels[1])
    a0, s0 = vp(levels[0])
    x_p = a1 * m[0] if s1 == 0 else s1 / s0 * x_c - a1 * math.expm1(-(lam[1] - lam[0])) * m[0]
    orders_p = [1]
    for i in range(1, N):
        m_t = denoiser(x_p, levels[i])
        alpha_t, sigma_t = vp(levels[i])
        order_p = min(2, i + 1, N - i)
        if levels[i + 1] >= 1:
            order_p = 1
        an, sn = vp(levels[i + 1])
        x_c, x_p = unipc.reference_step(x_c, m, m_t, lam[:i], alpha_t, sigma_t, vp(levels[i - 1])[1],
                                        orders_p[-1], order_p, an, sn, lam[i + 1])
        m.append(m_t)
        orders_p.append(order_p)
    noises = torch.zeros(table.rows, *SHAPE, dtype=F64)
    torch.testing.assert_close(run_table(table, x0, noises), x_p, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("space", ["vp", "ve"])
def test_prediction_conversion_is_the_textbook_map(prediction, space):
    torch.manual_seed(6)
    abar = 0.37
    a, s = vp(abar)
    x0, eps = torch.randn(SHAPE, dtype=F64), torch.randn(SHAPE, dtype=F64)
    x_t = a * x0 + s * eps
    out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[prediction]
    c_in, d_point, d_out = conversion(prediction, space, abar)
    point = x_t if space == "vp" else x_t / a
    torch.testing.assert_close(c_in * point, x_t, rtol=1e-12, atol=1e-12)  # the model sees x_t
    torch.testing.assert_close(d_point * point + d_out * out, x0, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("to_vp", [1.0, 0.8])
def test_langevin_step_matches_algorithm_5(to_vp):
    """The library's batched update (VP, and a VE point scaled by alpha) against the textbook step."""
    torch.manual_seed(7)
    x = torch.randn(2, *SHAPE, dtype=F64)
    D0 = torch.randn(2, *SHAPE, dtype=F64)
    z = torch.randn(2, *SHAPE, dtype=F64)
    a, s = vp(0.6)
    ours = langevin.update(x / to_vp, D0, z, a, s, 0.16, 0.99, to_vp)
    for b in range(2):
        want = langevin.reference_step(x[b], D0[b], z[b], a, s, 0.16, 0.99)
        torch.testing.assert_close(ours[b] * to_vp, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["x", "D", "D_raw", "z"])
def test_each_column_is_the_documented_quantity(name):
    """A one-row table whose state picks column `name` makes the torch executor return that
    quantity, computed here from the module docstring's definitions (D = clip(D_raw))."""
    row = [0.0] * len(COLUMNS)
    row[COLUMNS.index(name)] = 1.0
    f = lambda *v: torch.tensor(v, dtype=F64)  # noqa: E731
    table = StepTable(solver="one-column", space="vp", t_model=f(500.0), sigma=f(1.0), c_in=f(1.0),
                      d_point=f(0.5), d_out=f(2.0), state=f(row), point=None, push=torch.tensor([False]),
                      init_noise_sigma=1.0)
    bufs = LoopBuffers(table, 2, (5,), torch.float32, "cpu", cfg=False)
    executor = TorchExecutor(table, bufs, Thresholding(clip=1.0))
    g = torch.Generator().manual_seed(3)
    x, out, seeds = 2 * torch.randn(2, 5, generator=g), 2 * torch.randn(2, 5, generator=g), torch.tensor([3, 4])
    bufs.load(x, seeds, None, {}, 1.0)
    executor.step(0, out)
    D_raw = 0.5 * x + 2.0 * out
    want = {"x": x, "D": D_raw.clamp(-1, 1), "D_raw": D_raw, "z": rng.randn(seeds, 0, STREAM_STEP, (5,))}[name]
    torch.testing.assert_close(bufs.x, want)


@pytest.mark.parametrize("prediction", ["flow", "epsilon", "sample"])
@pytest.mark.parametrize("space", ["vp", "ve", "flow"])
def test_flow_conversion_is_the_textbook_map(prediction, space):
    """On a flow process x_s = (1 - s) x0 + s eps: the model sees x_s and D is x0, in every space."""
    from fastdiff.schedules import flow_level

    torch.manual_seed(7)
    s = 0.63
    abar = float(flow_level(s))
    x0, eps = torch.randn(SHAPE, dtype=F64), torch.randn(SHAPE, dtype=F64)
    x_s = (1 - s) * x0 + s * eps
    out = {"flow": eps - x0, "epsilon": eps, "sample": x0}[prediction]
    point = {"vp": x_s / math.sqrt((1 - s) ** 2 + s * s), "ve": x_s / (1 - s), "flow": x_s}[space]
    c_in, d_point, d_out = conversion(prediction, space, abar, "flow")
    torch.testing.assert_close(c_in * point, x_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_point * point + d_out * out, x0, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_coefficients_integrate_the_lagrange_basis(order):
    """lms's closed-form coefficients against numerical quadrature of the Lagrange basis (as
    k-diffusion and diffusers compute them)."""
    from scipy import integrate

    from fastdiff.solvers import lms

    sigmas = [14.6, 6.1, 2.9, 1.2, 0.5, 0.0]
    i = 4
    for j in range(order):
        def basis(tau):
            return math.prod((tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in range(order) if k != j)

        want = integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-12)[0]
        assert math.isclose(lms.coefficient(sigmas, i, order, j), want, rel_tol=1e-10, abs_tol=1e-12)
