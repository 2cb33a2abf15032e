"""Pure vectorized jnp loss functions."""
from tipr_jax.losses.irra import cmpm
from tipr_jax.losses.irra import gather_masked_positions
from tipr_jax.losses.irra import id_loss
from tipr_jax.losses.irra import itc
from tipr_jax.losses.irra import mlm_accuracy
from tipr_jax.losses.irra import mlm_loss
from tipr_jax.losses.irra import sdm

__all__ = ["cmpm", "gather_masked_positions", "id_loss", "itc", "mlm_accuracy", "mlm_loss", "sdm"]
