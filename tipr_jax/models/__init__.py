"""Flax models: CLIP towers, dual encoder, pretrained-weight loading."""
from tipr_jax.models.clip import (CLIPConfig, DualEncoder, TextTransformer, VisionTransformer,
                                  causal_mask, eot_pool)
from tipr_jax.models.layers import (MLP, BlockInit, LayerNorm, MultiHeadAttention,
                                    ResidualAttentionBlock, Transformer, attention, quick_gelu)
from tipr_jax.models.pretrained import from_pretrained, load_converted, save_converted

__all__ = [
    "CLIPConfig", "DualEncoder", "TextTransformer", "VisionTransformer", "causal_mask",
    "eot_pool", "MLP", "BlockInit", "LayerNorm", "MultiHeadAttention",
    "ResidualAttentionBlock", "Transformer", "attention", "quick_gelu", "from_pretrained",
    "load_converted", "save_converted",
]
