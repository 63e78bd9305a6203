"""Linear solvers for :math:`A x = b` on trees of tensors, one module per solver."""

from ._base import Solver
from .cg import CG
from .gmres import GMRES
from .identity import Identity
from .layerwise_cg import LayerwiseCG
from .minres import MINRES
from .neumann import Neumann
from .recycled_cg import RecycledCG
from .refinement import Refinement

__all__ = ["CG", "GMRES", "MINRES", "Identity", "LayerwiseCG", "Neumann", "RecycledCG", "Refinement", "Solver"]
