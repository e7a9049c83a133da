"""Chip data sheets: peak FLOP/s per device (for MFU) and memory per device (for the
pre-launch check)."""

from typing import Optional

import jax

GiB = 2**30

# Dense bf16 peak FLOP/s per chip, by device_kind prefix (vendor data sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}

# HBM bytes per TPU chip, by device_kind prefix (Cloud TPU data sheets). TPU topologies
# described without a chip (ahead-of-time compiles) have no runtime memory figure.
HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5e": 16 * GiB,
    "TPU v5p": 95 * GiB,
    "TPU v5": 95 * GiB,
    "TPU v6 lite": 32 * GiB,  # v6e
    "TPU v6e": 32 * GiB,
}


def _by_kind(table: dict, device_kind: str):
  """The entry of the longest key that prefixes device_kind, else None."""
  matches = [k for k in table if device_kind.startswith(k)]
  return table[max(matches, key=len)] if matches else None


def peak_flops_per_device(override: Optional[float] = None) -> Optional[float]:
  """The config's value if set, else the table's for this device kind, else None."""
  if override:
    return float(override)
  return _by_kind(PEAK_FLOPS, jax.devices()[0].device_kind)


def memory_per_device(device) -> Optional[int]:
  """Bytes the device can hold: its runtime's limit (GPUs, TPUs in hand), else the data
  sheet's HBM for its kind (TPU topologies), else None (CPU)."""
  try:
    stats = device.memory_stats()
  except jax.errors.JaxRuntimeError:  # a topology's devices: "only for addressable"
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return _by_kind(HBM_BYTES, device.device_kind)
