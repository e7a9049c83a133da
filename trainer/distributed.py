"""Multi-host start: one JAX system across processes (TPU pod hosts, GPU nodes, or
several local processes in tests).

config.distributed.mode:
  'auto'   - where JAX can find its peers by itself (a Cloud TPU VM, a GKE or multislice
             TPU job, Slurm or Open MPI with more than one task), jax.distributed.initialize()
             with everything detected; elsewhere one process. Under Slurm and Open MPI, JAX
             then gives each process one GPU: launch one task per GPU.
  'manual' - coordinator address, process count and process id from the config; a setting
             left empty is read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES or
             JAX_PROCESS_ID. Nothing is auto-detected, so each process keeps all its local
             devices (one process per node: scripts/launch_gpu.py).
  'off'    - one process, whatever the environment says.
It must run before anything touches a device (JAX refuses to join a system after that).
"""

import glob
import os

import jax
import ml_collections
from absl import logging

MODES = ("auto", "manual", "off")


def _has_tpu_chips() -> bool:
  """TPU chips attached to this host: /dev/accel<n> (v2-v4) or /dev/vfio/<n> (v5e on)."""
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _env_int(name: str) -> int:
  return int(os.environ.get(name, "1") or "1")


def _tpu_allowed() -> bool:
  """JAX may use TPUs here: JAX_PLATFORMS unset or naming tpu. With JAX_PLATFORMS=cpu on
  a TPU host (eval beside a training job) the chips and the slice are not this
  process's to join."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  return not platforms or "tpu" in platforms.split(",")


def _cluster_signs() -> list[str]:
  """What says jax.distributed.initialize() with no arguments finds peers here (none:
  a single process)."""
  signs = []
  if _tpu_allowed():
    signs += ["TPU chips (/dev/accel* or /dev/vfio/*)"] if _has_tpu_chips() else []
    signs += [v for v in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
              if os.environ.get(v)]
  return signs + [f"{v}={os.environ[v]}" for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
                  if _env_int(v) > 1]


def _cluster_detected() -> bool:
  return bool(_cluster_signs())


def manual_settings(cfg: ml_collections.ConfigDict) -> tuple[str, int, int]:
  """(coordinator address, process count, process id) from the config, else the
  environment; ValueError naming the setting when one is missing or out of range."""
  address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not address:
    raise ValueError("distributed.mode='manual' needs distributed.coordinator_address (or "
                     "JAX_COORDINATOR_ADDRESS): host:port of process 0.")
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"distributed.coordinator_address={address!r} needs host:port, e.g. "
                     f"{address.rstrip(':')}:12355 (process 0 listens on that port).")
  values = {}
  for field, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
    value = cfg[field] if cfg[field] is not None else os.environ.get(env)
    if value is None or value == "":
      raise ValueError(f"distributed.mode='manual' needs distributed.{field} (or {env}).")
    values[field] = int(value)
  count, index = values["num_processes"], values["process_id"]
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"distributed.process_id={index} must be in [0, num_processes={count}).")
  return address, count, index


def initialize(cfg: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize as cfg.mode says; a no-op if already initialized."""
  if cfg.mode not in MODES:
    raise ValueError(f"distributed.mode={cfg.mode!r} must be one of {', '.join(MODES)}.")
  if jax.distributed.is_initialized() or cfg.mode == "off":
    return
  if cfg.mode == "manual":
    address, count, index = manual_settings(cfg)
    # CPU processes talk over gloo, JAX's default for CPU collectives.
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index, cluster_detection_method="deactivate")
  elif _cluster_detected():
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as error:
      raise RuntimeError(
          f"distributed.mode='auto' took this for a cluster ({', '.join(_cluster_signs())}) "
          f"but jax.distributed.initialize() could not join one: {error} On a single "
          "machine set --config.distributed.mode=off; on a cluster give the coordinator "
          "with --config.distributed.mode=manual (see trainer/distributed.py).") from error
  else:
    return
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
