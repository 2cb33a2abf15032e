"""Analytic FLOPs of one IRRA training pair (2 FLOPs per multiply-add, matmuls only).

The towers come from `tipr_jax.models.flops`; this module adds the IRRA heads (irra-reference.md §2.3,
§2.4) and sums what an implementation computes per image-caption pair:

  image tower (193 tokens) + text passes (1 when the masked caption feeds SDM/ID, else 2)
  + cross-attention (77 text queries over 193 image tokens) + `cmt_depth` blocks on 77 tokens
  + MLM head (dense 512->512 and fc 512->vocab) on `mlm_positions` positions
  + the shared ID classifier on both global features + the SDM similarity row.

Training FLOPs = 3x forward (each matmul's backward computes the weight and the input gradient),
minus the patch embedding's input gradient (images need none).
"""
from __future__ import annotations

from tipr_jax.models.clip import CLIPConfig
from tipr_jax.models.flops import text_flops, transformer_flops, vision_flops


def cross_attention_flops(queries: int, keys: int, width: int) -> int:
  """One cross-attention layer: q proj 2Ld^2, k/v proj 4Nd^2, QK^T + AV 4LNd, out proj 2Ld^2."""
  l, n, d = queries, keys, width
  return 4 * l * d * d + 4 * n * d * d + 4 * l * n * d


def mlm_head_flops(positions: int, width: int, vocab: int) -> int:
  """dense (d->d) and fc (d->vocab) on `positions` tokens."""
  return 2 * positions * width * width + 2 * positions * width * vocab


def head_flops(cfg: CLIPConfig, *, cmt_depth: int, num_classes: int, mlm_positions: int,
               batch: int) -> dict[str, int]:
  """Forward FLOPs of the IRRA heads per pair: {cross_attn, cmt, mlm_head, classifier, sdm}."""
  d, length = cfg.embed_dim, cfg.context_length
  return dict(
      cross_attn=cross_attention_flops(length, cfg.num_image_tokens, d),
      cmt=transformer_flops(length, d, cmt_depth),
      mlm_head=mlm_head_flops(mlm_positions, d, cfg.vocab_size),
      classifier=2 * 2 * d * num_classes,  # image and text features
      sdm=2 * batch * d,                    # one row of the B x B similarity
  )


def patch_embed_flops(cfg: CLIPConfig) -> int:
  gh, gw = cfg.grid_size
  return 2 * gh * gw * cfg.patch_size ** 2 * 3 * cfg.vision_width


def pair_flops(cfg: CLIPConfig, *, cmt_depth: int = 4, num_classes: int = 11003,
               mlm_positions: int | None = None, text_passes: int = 1,
               batch: int = 8) -> dict[str, float]:
  """Per-pair forward FLOPs by part, plus 'forward' and 'train' totals.

  mlm_positions: positions the vocabulary projection runs on (None: all context_length);
  text_passes: 1 (our masked_caption_for_global) or 2 (the reference).
  """
  positions = cfg.context_length if mlm_positions is None else mlm_positions
  parts = dict(image=vision_flops(cfg), text=text_passes * text_flops(cfg))
  parts.update(head_flops(cfg, cmt_depth=cmt_depth, num_classes=num_classes,
                          mlm_positions=positions, batch=batch))
  forward = sum(parts.values())
  out = {k: float(v) for k, v in parts.items()}
  out["forward"] = float(forward)
  out["train"] = float(3 * forward - patch_embed_flops(cfg))
  return out
