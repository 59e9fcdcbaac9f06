"""fastdiff.kernels.solver_table against the float64 host builders (fastdiff.solvers.build_table)."""
import warnings

import pytest
import torch

from fastdiff import Schedule, make_grid
from fastdiff.kernels import solver_table
from fastdiff.solvers import STRIDE_PREV, build_table

# valid grids run without a single inf/nan warning from the interpreter's numpy
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
TOL = 1e-12  # relative + absolute, fp64
# (solver, options): each one-row-per-step solver with its option branches
CASES = [
    ("ddpm", {"variance": "fixed_small"}),
    ("ddpm", {"variance": "fixed_large"}),
    ("ddim", {"eta": 0.0}),
    ("ddim", {"eta": 0.5}),
    ("ddim", {"eta": 1.0}),
    ("euler", {}),
    ("euler_ancestral", {}),
    ("dpmpp_2m", {"lower_order_final": True}),
    ("dpmpp_2m", {"lower_order_final": False}),
    ("dpmpp_2m_sde", {"lower_order_final": True}),
    ("dpmpp_2m_sde", {"lower_order_final": False}),
]
# name -> (schedule, make_grid options); ddpm/ddim also get diffusers' stride_prev, as the sampler does
SCHEDULES = {
    "linear": Schedule.linear(1000),
    "scaled_linear": Schedule.scaled_linear(1000),
    "cosine": Schedule.cosine(1000),
}
GRIDS = {
    "linear-trailing": ("linear", {"spacing": "trailing"}),
    "scaled_linear-leading": ("scaled_linear", {"spacing": "leading"}),
    "cosine-linspace": ("cosine", {"spacing": "linspace"}),
    "scaled_linear-karras": ("scaled_linear", {"sigmas": "karras"}),
    "linear-leading-final_abar<1": ("linear", {"spacing": "leading", "final_abar": 0.99995}),
}
STEPS = (1, 2, 7, 50, 1000)
PREDICTIONS = ("epsilon", "sample", "v_prediction")


def grid_for(solver, schedule, steps, **opts):
    return make_grid(schedule, steps, stride_prev=solver in STRIDE_PREV and "sigmas" not in opts, **opts)


def assert_matches_host(got, want, context=""):
    """Every per-row column and init_noise_sigma to TOL; lists the first mismatches."""
    cols = {"state": want.state, "c_in": want.c_in, "d_point": want.d_point, "d_out": want.d_out,
            "sigma": want.sigma, "init_noise_sigma": torch.tensor(want.init_noise_sigma, dtype=torch.float64)}
    for name, w in cols.items():
        g = got[name].cpu()
        assert g.dtype == torch.float64 and g.shape == w.shape, f"{context} {name}: {g.dtype} {tuple(g.shape)}"
        bad = ~((g - w).abs() <= TOL * (1 + w.abs()))
        bad &= ~(g == w)  # equal infinities
        if bool(bad.any()):
            idx = bad.nonzero()[:5].tolist()
            lines = [f"  {tuple(i)}: got {g[tuple(i)].item()!r}, want {w[tuple(i)].item()!r}" for i in idx]
            pytest.fail(f"{context} {name}: {int(bad.sum())} mismatches, first:\n" + "\n".join(lines))


def run_both(solver, grid, prediction, device, **options):
    want = build_table(solver, grid, prediction, **options)
    got = solver_table(solver, grid.abar.to(device), grid.abar_to.to(device), grid.t.to(device), prediction,
                       **options)
    return got, want


CASE_IDS = [f"{s}-{'-'.join(f'{k}={v}' for k, v in o.items())}".rstrip("-") for s, o in CASES]


@pytest.mark.parametrize("grid_name", list(GRIDS))
@pytest.mark.parametrize("solver,options", CASES, ids=CASE_IDS)
def test_matches_build_table(kernel_device, solver, options, grid_name):
    schedule_name, grid_opts = GRIDS[grid_name]
    spacing = grid_opts.get("spacing", "trailing")  # the Euler family's init_noise_sigma depends on it
    for k, steps in enumerate(STEPS):
        grid = grid_for(solver, SCHEDULES[schedule_name], steps, **grid_opts)
        # the prediction only enters the conversion columns: rotate it over the step counts and grids
        prediction = PREDICTIONS[(k + list(GRIDS).index(grid_name)) % len(PREDICTIONS)]
        got, want = run_both(solver, grid, prediction, kernel_device, spacing=spacing, **options)
        assert_matches_host(got, want, f"{solver} {options} {grid_name} N={steps} {prediction}")


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("solver,options", CASES, ids=CASE_IDS)
def test_every_prediction(kernel_device, solver, options, prediction):
    for grid_name in ("scaled_linear-leading", "scaled_linear-karras"):
        schedule_name, grid_opts = GRIDS[grid_name]
        grid = grid_for(solver, SCHEDULES[schedule_name], 30, **grid_opts)
        got, want = run_both(solver, grid, prediction, kernel_device, spacing=grid_opts.get("spacing", "trailing"),
                             **options)
        assert_matches_host(got, want, f"{solver} {options} {grid_name} {prediction}")


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"])
@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
def test_zero_terminal_snr(kernel_device, solver, prediction):
    # abar = 0 at the first step: lambda = -inf, h = inf, e^{-h} = 0 (Lin et al. 2023)
    schedule = Schedule.scaled_linear(1000).rescale_zero_terminal_snr()
    for steps in (1, 2, 25):
        grid = grid_for(solver, schedule, steps, spacing="trailing")
        assert float(grid.abar[0]) == 0.0
        got, want = run_both(solver, grid, prediction, kernel_device, eta=1.0)
        assert_matches_host(got, want, f"{solver} N={steps} {prediction}")


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_first_order_dpmpp(kernel_device, solver):
    grid = grid_for(solver, SCHEDULES["linear"], 20)
    got, want = run_both(solver, grid, "epsilon", kernel_device, solver_order=1)
    assert_matches_host(got, want, solver)
    assert bool((got["state"][:, 3] == 0).all())  # no history term


def test_several_programs(kernel_device):
    # N > MAX_BLOCK: the previous step's level is read across a program boundary
    grid = grid_for("dpmpp_2m", Schedule.linear(4000), 2000, spacing="trailing")
    for solver in ("dpmpp_2m", "euler_ancestral", "ddim"):
        got, want = run_both(solver, grid, "v_prediction", kernel_device, eta=0.5)
        assert_matches_host(got, want, solver)


def host_error(solver, grid, prediction, **options) -> str:
    with pytest.raises(ValueError) as info:
        build_table(solver, grid, prediction, **options)
    return str(info.value)


@pytest.mark.parametrize("solver,prediction", [("ddpm", "epsilon"), ("ddim", "epsilon"), ("dpmpp_2m", "epsilon"),
                                               ("euler", "v_prediction"), ("euler_ancestral", "sample")])
def test_invalid_grid_raises_as_the_host(kernel_device, solver, prediction):
    # zero terminal SNR: epsilon is undefined at abar = 0, the Euler family's sigma is infinite
    grid = grid_for(solver, Schedule.scaled_linear(1000).rescale_zero_terminal_snr(), 10, spacing="trailing")
    message = host_error(solver, grid, prediction)
    args = (grid.abar.to(kernel_device), grid.abar_to.to(kernel_device), grid.t.to(kernel_device), prediction)
    with pytest.raises(ValueError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy on the bad row's 1/0
        solver_table(solver, *args)
    assert str(info.value) == message
    # check=False: no raise (no host sync); the rows after the bad one are still the host's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = solver_table(solver, *args, check=False)
    want = build_table(solver, grid[1:], prediction)
    k = 2 if solver.startswith("dpmpp") else 1  # DPM-Solver++'s row 1 reads row 0's level
    for name in ("state", "c_in", "d_point", "d_out", "sigma"):
        torch.testing.assert_close(got[name][k:].cpu(), getattr(want, name)[k - 1:], rtol=TOL, atol=TOL)


def test_ddim_eta_too_large(kernel_device):
    grid = grid_for("ddim", SCHEDULES["linear"], 2, spacing="trailing")
    message = host_error("ddim", grid, "epsilon", eta=1.5)
    with pytest.raises(ValueError) as info:
        solver_table("ddim", grid.abar.to(kernel_device), grid.abar_to.to(kernel_device), grid.t.to(kernel_device),
                     "epsilon", eta=1.5)
    assert str(info.value) == message


def test_validation(kernel_device):
    grid = grid_for("ddim", SCHEDULES["linear"], 10)
    a, a_to, t = (v.to(kernel_device) for v in (grid.abar, grid.abar_to, grid.t))
    for solver in ("heun", "unipc", "lms"):
        with pytest.raises(ValueError, match="supported: ddpm, ddim, euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde"):
            solver_table(solver, a, a_to, t, "epsilon")
    with pytest.raises(ValueError, match="float64"):
        solver_table("ddim", a.float(), a_to, t, "epsilon")
    with pytest.raises(ValueError, match="shape"):
        solver_table("ddim", a, a_to[:-1], t, "epsilon")
    with pytest.raises(ValueError, match="at least one step"):
        solver_table("ddim", a[:0], a_to[:0], t[:0], "epsilon")
    with pytest.raises(ValueError, match="prediction"):
        solver_table("ddim", a, a_to, t, "x0")
    with pytest.raises(ValueError, match="variance"):
        solver_table("ddpm", a, a_to, t, "epsilon", variance="learned")
    with pytest.raises(ValueError, match="spacing"):
        solver_table("euler", a, a_to, t, "epsilon", spacing="karras")
    with pytest.raises(ValueError, match="solver_order"):
        solver_table("dpmpp_2m", a, a_to, t, "epsilon", solver_order=3)
