"""Peak dense FLOP/s of known accelerators, for MFU. Unknown devices (CPUs) report no MFU."""

from __future__ import annotations

import jax

# Dense (no sparsity) peak per device, from the vendors' data sheets.
PEAK_FLOPS = {
    # device_kind substring: {dtype: FLOP/s}
    "H100": {"bfloat16": 989e12, "float32": 67e12},  # SXM; TF32 tensor cores are not used for f32 by default
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6": {"bfloat16": 918e12, "float32": 918e12},
}


def peak_flops_per_device(compute_dtype: str, device: jax.Device | None = None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for name, peaks in PEAK_FLOPS.items():
    if name in kind:
      return peaks[compute_dtype]
  return None
