"""Multi-host start: one JAX system across processes (TPU pod hosts, GPU nodes, or
several local processes in tests)."""

import os

import jax
import ml_collections
from absl import logging


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # 'auto': initialize on TPU pods / managed clusters (jax detects the topology),
      # 'off': single process, 'manual': use the fields below (GPU clusters, tests).
      mode="auto",
      coordinator_address="",  # host:port of process 0
      num_processes=1,
      process_id=0,
  ))


def _on_managed_cluster() -> bool:
  """True where jax.distributed.initialize() can find its peers by itself."""
  markers = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
             "OMPI_COMM_WORLD_SIZE")
  return any(os.environ.get(m) for m in markers)


def initialize(cfg: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize as the config (or the environment) says; idempotent."""
  if cfg.mode not in ("auto", "off", "manual"):
    raise ValueError(f"distributed.mode={cfg.mode!r} must be 'auto', 'off' or 'manual'.")
  if cfg.mode == "off" or (cfg.mode == "auto" and not _on_managed_cluster()):
    return
  if jax.distributed.is_initialized():
    return
  if cfg.mode == "manual":
    if not cfg.coordinator_address:
      raise ValueError("distributed.mode='manual' needs distributed.coordinator_address "
                       "(host:port of process 0).")
    if jax.default_backend() == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                               num_processes=cfg.num_processes, process_id=cfg.process_id)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
