"""Test setup: 8 fake CPU devices, the 2-core deadlock workaround, a compilation cache,
and the machine shared between pytest-xdist's workers.

The environment must be set before jax is imported anywhere.
"""

import fcntl
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=8",
    # jaxlib 0.10.2 on CPU can deadlock on concurrent vmapped triangular solves.
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
]).strip()
CACHE = pathlib.Path(__file__).resolve().parent.parent / ".cache"
CACHE.mkdir(exist_ok=True)  # holds the compilation cache and the machine's locks
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE / "jax"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# Test files run in parallel, one xdist worker per core. A test marked `exclusive` (its
# processes must keep pace with each other: gloo's rendezvous has a fixed 30 s deadline)
# runs with no other test beside it: every test holds a shared lock on the machine, an
# exclusive one holds it alone, and a turnstile lets a waiting exclusive test in before
# the next shared one. flock locks are released when their file closes, so a crashed
# worker holds nothing.


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  exclusive = item.get_closest_marker("exclusive") is not None
  with open(CACHE / "tests.turnstile", "a") as turnstile, \
       open(CACHE / "tests.lock", "a") as machine:
    fcntl.flock(turnstile, fcntl.LOCK_EX)
    fcntl.flock(machine, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    if not exclusive:
      fcntl.flock(turnstile, fcntl.LOCK_UN)
    return (yield)
