"""Analytic forward FLOPs of the CLIP towers (2 FLOPs per multiply-add, matmuls only).

Counted: patch embedding, q/k/v in-projection, QK^T, AV, attention out-projection,
MLP (d -> 4d -> d), and the final projection applied to all tokens. Elementwise
work (LayerNorm, softmax, QuickGELU, residual adds) is not counted; it is
~1-3% of XLA's own count at the sizes used here (less at full size).
Training (forward + backward) is ~3x the forward.
"""
from __future__ import annotations

from tipr_jax.models.clip import CLIPConfig


def transformer_flops(tokens: int, width: int, layers: int, kv_tokens: int | None = None) -> int:
  """Forward FLOPs of `layers` residual blocks on one sequence of `tokens` tokens.

  Per layer: q/k/v 6*N*d^2, out-proj 2*N*d^2, MLP 16*N*d^2, QK^T and AV 2*N*M*d each
  (M = kv_tokens, default N): 24*N*d^2 + 4*N*M*d.
  """
  n, d = tokens, width
  m = n if kv_tokens is None else kv_tokens
  return layers * (24 * n * d * d + 4 * n * m * d)


def vision_flops(cfg: CLIPConfig, batch: int = 1) -> int:
  """Forward FLOPs of the image tower for `batch` images of cfg.image_size."""
  gh, gw = cfg.grid_size
  patches = gh * gw
  n, d = 1 + patches, cfg.vision_width
  patch_embed = 2 * patches * cfg.patch_size ** 2 * 3 * d
  proj = 2 * n * d * cfg.embed_dim
  return batch * (patch_embed + transformer_flops(n, d, cfg.vision_layers) + proj)


def text_flops(cfg: CLIPConfig, batch: int = 1, length: int | None = None) -> int:
  """Forward FLOPs of the text tower for `batch` captions of `length` (default context) tokens."""
  n, d = length or cfg.context_length, cfg.text_width
  return batch * (transformer_flops(n, d, cfg.text_layers) + 2 * n * d * cfg.embed_dim)
