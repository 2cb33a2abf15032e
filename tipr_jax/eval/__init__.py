"""Retrieval evaluation: metrics (and encoding for evaluation)."""
from tipr_jax.eval.metrics import rank_of_first_hit
from tipr_jax.eval.metrics import retrieval_metrics
from tipr_jax.eval.metrics import retrieval_metrics_from_features

__all__ = ["rank_of_first_hit", "retrieval_metrics", "retrieval_metrics_from_features"]
