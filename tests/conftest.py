"""Test set-up: 8 CPU devices so that every sharded code path is exercised."""
import jax

jax.config.update("jax_num_cpu_devices", 8)
