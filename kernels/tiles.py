"""Tiles of per-sample kernels over x [B, N], on a 1-D grid (shared by the kernels).

A GPU grid's axes 1 and 2 stop at 65535 programs (axis 0 at 2**31 - 1): a batch on axis 1
could not launch B >= 65536 (add_noise over 100k points). So the grid is one axis of tiles:

    chunks = cdiv(N, BLOCK_N)
    program p covers samples b = ROWS * (p // chunks) + [0, ROWS)
                 and elements e = BLOCK_N * (p % chunks) + [0, BLOCK_N) of each

Small samples share a program (ROWS > 1: N = 3 fills a 1024-element tile, not 3 lanes of
16); large ones are chunked (ROWS = 1). Offsets are int64. Noise stays keyed by (sample,
element), so the tile shape never changes a value.
"""
import triton
import triton.language as tl

TILE = 1024  # elements per program
# 4 elements a thread: one 16-byte fp32 vector, and an fp16/bf16 tensor then takes the same
# layout (at 8 a thread its 16-byte vectors hold 8 halves, the fp32 tensors' 4: every fp16
# load and store went through a 4 KB shared-memory layout conversion; the compile report
# shows 0 B now, and fewer registers). Elementwise kernels: no value depends on it.
NUM_WARPS = TILE // (4 * 32)
MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's limits per grid axis


def tile_shape(N: int) -> tuple[int, int]:
    """(ROWS, BLOCK_N) for samples of N elements: BLOCK_N a power of two >= 4 (noise comes
    in fours), ROWS * BLOCK_N = TILE."""
    block_n = min(TILE, max(4, triton.next_power_of_2(N)))
    return TILE // block_n, block_n


def launch_grid(op: str, B: int, N: int, rows: int, block_n: int) -> tuple[int]:
    """The 1-D grid of tiles; a ValueError naming `op` when it exceeds CUDA's axis-0 limit."""
    programs = triton.cdiv(B, rows) * triton.cdiv(N, block_n)
    if programs > MAX_GRID[0]:
        raise ValueError(f"{op}: [{B}, {N}] needs {programs} programs of {rows}x{block_n} elements, "
                         f"more than a grid's {MAX_GRID[0]}")
    return (programs,)


@triton.jit
def sample_tile(B, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: b [ROWS, 1], e [1, BLOCK_N] (int64), its first element `start`,
    the element mask [ROWS, BLOCK_N] and the sample mask [ROWS, 1]."""
    pid = tl.program_id(0).to(tl.int64)
    chunks = tl.cdiv(N, BLOCK_N)
    start = (pid % chunks) * BLOCK_N
    b = ((pid // chunks) * ROWS + tl.arange(0, ROWS))[:, None]
    e = (start + tl.arange(0, BLOCK_N))[None, :]
    in_batch = b < B
    return b, e, start, in_batch & (e < N), in_batch
