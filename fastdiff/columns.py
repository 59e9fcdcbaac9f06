"""The affine row's column vector, shared by the coefficient table (fastdiff.solvers.table,
which documents it) and the fused step kernel that executes it (kernels/affine_step.py):

    V = [x, P, D, D_raw, H0, H1, H2, z]

P is the point the model saw this row (x itself in a table without separate points).
"""
from __future__ import annotations

COLUMNS = ("x", "P", "D", "D_raw", "H0", "H1", "H2", "z")
NCOL = len(COLUMNS)
X, P, D, D_RAW, H0, H1, H2, Z = range(NCOL)
MAX_HISTORY = 3  # history slots H0..H2
