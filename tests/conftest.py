"""Test session setup.

Eight fake CPU devices are configured before JAX initialises so that sharding tests can build
real meshes; every other test runs on the default (first) device.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
