"""hypergrad: implicit hypergradients for bilevel optimisation in PyTorch.

Hessian-vector products (:func:`hvp`, :class:`HessianOperator`), linear operators on trees of
tensors, solvers that report what happened (:class:`CG`, :class:`LayerwiseCG`, :class:`Neumann`,
:class:`MINRES`, :class:`GMRES`, :class:`Identity`, :class:`NystromPreconditioner`; for many solves
with one operator :class:`Refinement` with :func:`low_precision` products and :class:`RecycledCG`
with a :class:`KrylovRecycler`), and implicit
differentiation (:func:`implicit_grad`, :func:`fixed_point_grad`, :func:`darts_grad`,
:func:`custom_root`); unrolled differentiation (:func:`unrolled_grad`) and fully first-order
estimators (:func:`f2sa_grad`, :func:`penalty_grad`) behind the same call shape.
"""

from ._custom_root import custom_root
from ._errors import (
    EstimatorSettingError,
    HypergradError,
    IndefiniteSketchError,
    InnerDependenceError,
    NonFiniteError,
    NotStationaryWarning,
    NystromRankWarning,
    OperatorTagError,
    SolveFailureError,
    SolveFailureWarning,
    SolverBreakdownError,
    ThirdDerivativeError,
    TransformError,
    TreeMismatchError,
)
from ._estimate import EstimatorStats
from ._first_order import PenaltySchedule, f2sa_grad, penalty_grad
from ._hvp import GradientGraph, VJPGraph, gradient, hvp, hvp_batched, mixed_vjp
from ._implicit import ImplicitStats, darts_grad, fixed_point_grad, implicit_grad
from ._module import functional, module_buffers, module_params
from ._operator import (
    DampedOperator,
    FunctionOperator,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
)
from ._precision import CastOperator, autocast_objective, low_precision
from ._preconditioner import NystromPreconditioner
from ._recycler import KrylovRecycler
from ._solution import Result, Solution, SolveStats
from ._solver import (
    CG,
    GMRES,
    MINRES,
    Identity,
    LayerwiseCG,
    Neumann,
    RecycledCG,
    Refinement,
    Solver,
)
from ._tree import Tree
from ._unrolled import unrolled_grad
from .distributed import DistributedOperator, all_reduce_mean

__version__ = "0.1.0"

__all__ = [
    "CG",
    "GMRES",
    "MINRES",
    "CastOperator",
    "DampedOperator",
    "DistributedOperator",
    "EstimatorSettingError",
    "EstimatorStats",
    "FunctionOperator",
    "GradientGraph",
    "HessianOperator",
    "HypergradError",
    "Identity",
    "ImplicitStats",
    "IndefiniteSketchError",
    "InnerDependenceError",
    "KrylovRecycler",
    "LayerwiseCG",
    "LinearOperator",
    "MatrixOperator",
    "Neumann",
    "NonFiniteError",
    "NotStationaryWarning",
    "NystromPreconditioner",
    "NystromRankWarning",
    "OperatorTagError",
    "PenaltySchedule",
    "RecycledCG",
    "Refinement",
    "Result",
    "Solution",
    "SolveFailureError",
    "SolveFailureWarning",
    "SolveStats",
    "Solver",
    "SolverBreakdownError",
    "ThirdDerivativeError",
    "TransformError",
    "Tree",
    "TreeMismatchError",
    "VJPGraph",
    "__version__",
    "all_reduce_mean",
    "autocast_objective",
    "custom_root",
    "darts_grad",
    "f2sa_grad",
    "fixed_point_grad",
    "functional",
    "gradient",
    "hvp",
    "hvp_batched",
    "implicit_grad",
    "low_precision",
    "mixed_vjp",
    "module_buffers",
    "module_params",
    "penalty_grad",
    "unrolled_grad",
]
