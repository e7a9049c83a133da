"""PSGD Kron: preconditioned SGD with Kronecker-factored preconditioners, for optax.

Xi-Lin Li, "Preconditioned Stochastic Gradient Descent" (arXiv:1512.04202),
"Preconditioner on Matrix Lie Group for SGD" (arXiv:1809.10232),
"Stochastic Hessian Fittings with Lie Groups" (arXiv:2402.11858).
"""

__version__ = "0.1.0"

from psgd.fitting import MODES
from psgd.kron import (HYPERPARAMS, STATIC_ARGS, KronState, kron, layout_table, plan_layouts,
                       scale_by_kron)
from psgd.layout import Layout
from psgd.schedules import precond_lr_schedule, precond_update_prob_schedule
from psgd.sharding import state_partition_specs

__all__ = [
    "__version__", "HYPERPARAMS", "MODES", "STATIC_ARGS", "KronState", "Layout", "kron",
    "layout_table", "plan_layouts", "precond_lr_schedule", "precond_update_prob_schedule",
    "scale_by_kron",
    "state_partition_specs",
]
