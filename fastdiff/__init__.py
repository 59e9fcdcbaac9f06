"""fastdiff: fast, reproducible sampling for diffusion models.

Solvers compile to float64 coefficient tables (fastdiff.solvers); one affine executor runs
any row, in plain PyTorch or as one fused Triton kernel; on CUDA the whole loop is one graph.
"""
from .grids import Grid, make_grid
from .integrations import diffusers as _diffusers_integration  # noqa: F401  (attaches Sampler.from_diffusers)
from .likelihood import ELBO, ODELikelihood, elbo, log_likelihood
from .noising import add_noise
from .sampler import Sampler
from .schedules import FlowSchedule, Schedule
from .solvers import SOLVERS

__version__ = "0.1.0"


def load_pretrained(name_or_path="digits", device="cpu"):
    """A shipped model by name ("digits", "digits_classifier") or a saved .safetensors file
    (its .json beside it): model, Schedule, metadata and sampler_options(solver)
    (see fastdiff.models.pretrained)."""
    from .models.pretrained import load_pretrained as _load

    return _load(name_or_path, device=device)


__all__ = ["ELBO", "FlowSchedule", "Grid", "ODELikelihood", "Sampler", "Schedule", "SOLVERS", "add_noise", "elbo",
           "load_pretrained", "log_likelihood", "make_grid"]
