"""The affine row's column vector, shared by the coefficient table (fastdiff.solvers.table,
which documents it) and the fused step kernel that executes it (kernels/affine_step.py):

    V = [x, D, D_raw, H0, H1, H2, z]
"""
from __future__ import annotations

COLUMNS = ("x", "D", "D_raw", "H0", "H1", "H2", "z")
NCOL = len(COLUMNS)
X, D, D_RAW, H0, H1, H2, Z = range(NCOL)
MAX_HISTORY = 3  # history slots H0..H2
