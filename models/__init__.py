"""Models for the trainer, built from `config.model` through a registry.

    model = models.build(config.model, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    mask = models.scanned_mask(params)  # same tree structure as params

A new model is a module with a class under `@models.register("name")`, imported here.
"""

from models import transformer
from models.losses import cross_entropy
from models.metadata import (ParamInfo, matrix_axes, param_count, param_info,
                             partition_specs, scanned_mask, weight_decay_mask)
from models.registry import build, flops_per_token, names, register

__all__ = [
    "ParamInfo", "build", "cross_entropy", "flops_per_token", "matrix_axes", "names",
    "param_count",
    "param_info", "partition_specs", "register", "scanned_mask", "transformer",
    "weight_decay_mask",
]
