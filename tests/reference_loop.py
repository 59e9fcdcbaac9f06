"""The simplest loop over a coefficient table: fresh tensors every step, no static buffers,
any dtype (float64 gives the reference the fast paths are measured against)."""
import torch

from fastdiff import rng
from fastdiff.rng import STREAM_INIT, STREAM_STEP
from fastdiff.solvers.table import history_slots


def plain_loop(model, table, seeds, shape, cond=None, uncond=None, w=None, dtype=torch.float32):
    """w: None (no guidance), a number or [B] tensor, or a list with one such weight per row
    where None means the row is unguided: the model is called on `cond` alone."""
    x = rng.randn(seeds, 0, STREAM_INIT, shape).to(dtype) * table.init_noise_sigma
    point = x.clone()
    history = [None] * max(table.history_len, 1)
    for r, (slots, dest) in enumerate(history_slots(table)):
        p = point if table.point is not None else x
        t = torch.full((len(seeds),), float(table.t_model[r]))
        x_in = float(table.c_in[r]) * p
        w_r = w[r] if isinstance(w, list) else w
        if w_r is None:
            out = model(x_in, t, **(cond or {})).to(dtype)
        else:
            if torch.is_tensor(w_r):
                w_r = w_r.to(dtype).reshape(-1, *([1] * len(shape)))
            u, c = model(x_in, t, **uncond).to(dtype), model(x_in, t, **cond).to(dtype)
            out = u + w_r * (c - u)
        D = float(table.d_point[r]) * p + float(table.d_out[r]) * out
        z = rng.randn(seeds, r, STREAM_STEP, shape).to(dtype)
        V = [x, p, D, D] + [history[s] for s in slots] + [None] * (3 - len(slots)) + [z]
        comb = lambda row: sum(c * v for c, v in zip(row.tolist(), V) if c != 0)  # noqa: E731
        x_next = comb(table.state[r])
        point = comb(table.point[r]) if table.point is not None else x_next
        if dest is not None:
            history[dest] = D if table.push_row is None else comb(table.push_row[r])
        x = x_next
    return x
