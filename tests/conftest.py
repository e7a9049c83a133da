"""Test setup: 8 fake CPU devices, the 2-core deadlock workaround, a compilation cache.

The environment must be set before jax is imported anywhere.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=8",
    # jaxlib 0.10.2 on CPU can deadlock on concurrent vmapped triangular solves.
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
]).strip()
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"))

import jax  # noqa: E402

jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
