"""Peak FLOP/s per device, for MFU."""

from typing import Optional

import jax

# Dense bf16 peak FLOP/s per chip, by device_kind prefix (vendor data sheets).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(override: Optional[float] = None) -> Optional[float]:
  """The config's value if set, else the table's for this device kind, else None."""
  if override:
    return float(override)
  kind = jax.devices()[0].device_kind
  matches = [k for k in PEAK_FLOPS if kind.startswith(k)]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None
