"""kernels/tiles.py: per-sample kernels launch a 1-D grid of tiles within a GPU grid's limits.

CUDA limits a grid to 2**31 - 1 programs on axis 0 and 65535 on axes 1 and 2; Triton's
interpreter enforces neither, so the launchers' grids are checked here, at sizes no test
could run (the launches are recorded, not executed)."""
import pytest
import torch

from fastdiff.kernel_compile import record_launches
from fastdiff.kernels import affine_step, forward_noise
from fastdiff.kernels.affine_step import ROW_WIDTH
from fastdiff.kernels.tiles import MAX_GRID, TILE, launch_grid, tile_shape


def within_limits(grid):
    return len(grid) <= 3 and all(1 <= n <= limit for n, limit in zip(grid, MAX_GRID))


@pytest.mark.parametrize("B, N", [(65536, 3), (10**6, 2), (70000, 1025), (3, 2**20)])
def test_launchers_grids_stay_within_cuda_limits(B, N):
    """Before the 1-D grid, the batch sat on axis 1: B = 65536 asked for 65536 > 65535."""
    x = torch.empty(B, N)  # never written: the launches are recorded, not run
    seeds = torch.zeros(B, dtype=torch.int64)
    with record_launches(execute=False) as launches:
        forward_noise(x, torch.zeros(B, dtype=torch.float64), seeds)
        affine_step(0, torch.zeros(1, ROW_WIDTH), x, torch.empty(2 * B, N), cfg_w=torch.ones(B), seeds=seeds)
    assert len(launches) == 2
    for launch in launches:
        assert within_limits(launch.grid), launch.grid
        rows, block = launch.kwargs["ROWS"], launch.kwargs["BLOCK"]
        assert launch.grid[0] * rows * block >= B * N  # every element has a program


@pytest.mark.parametrize("N", [1, 3, 4, 5, 1000, 1024, 1025, 10**6])
def test_tile_shape(N):
    rows, block = tile_shape(N)
    assert rows * block == TILE and block % 4 == 0  # noise is drawn in fours
    assert block >= min(N, TILE) and (rows == 1 or block < max(8, 2 * N))  # at most twice a sample (>= 4)


def test_a_grid_beyond_axis_zero_is_refused():
    rows, block = tile_shape(2)
    assert launch_grid("op", MAX_GRID[0] * rows, 2, rows, block) == (MAX_GRID[0],)
    with pytest.raises(ValueError, match=r"op: \[.*\] needs 2147483648 programs"):
        launch_grid("op", MAX_GRID[0] * rows + 1, 2, rows, block)
