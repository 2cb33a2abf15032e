"""tipr_jax: text-to-image person retrieval in JAX/Flax."""
