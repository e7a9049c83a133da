"""Sections every run config shares; config files override what they need."""

import ml_collections

import models
from trainer import data, distributed, optim

# Logical axis -> mesh axes for a ('data', 'fsdp', 'tensor') mesh. 'batch' (data
# parallelism) spans data and fsdp; the model's rules shard its weights.
MESH_RULES = (("batch", ("data", "fsdp")), *models.transformer.LOGICAL_AXIS_RULES)


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.mesh = ml_collections.ConfigDict(dict(
      axes=("data", "fsdp", "tensor"), shape=(-1, 1, 1), rules=MESH_RULES))
  config.model = models.transformer.default_config()
  config.data = data.default_config()
  config.optimizer = optim.default_config()
  config.train = ml_collections.ConfigDict(dict(
      steps=1000,  # the run's length (the learning-rate schedule spans it)
      stop_at=0,  # if > 0: save and exit after this step (the run resumes later)
      global_batch_size=32,
      microbatches=1,  # gradient accumulation: the batch is split into this many parts
      log_every=10,
      eval_every=200,
      max_nonfinite_steps=10,  # stop after this many skipped (non-finite) steps in a row
      peak_flops_per_device=0.0,  # 0: from trainer/hardware.py's table
  ))
  config.checkpoint = ml_collections.ConfigDict(dict(
      save_every=100,
      max_to_keep=3,
      keep_every=ml_collections.config_dict.placeholder(int),  # keep every N-th step
      async_save=True,
      init_from="",  # another run's workdir, to start from its latest checkpoint
      init_what="params",  # 'params' or 'params_and_optimizer'
      # Resume a checkpoint that has no data position for this run's process count,
      # starting the data stream afresh (otherwise that is an error).
      restart_data=False,
  ))
  config.distributed = distributed.default_config()
  config.dry_run = ml_collections.ConfigDict(dict(
      topology="",  # --dry_run's target, a TPU topology like 'v5p:2x2x2'; '' = local devices
  ))
  return config
