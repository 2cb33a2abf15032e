"""UCFA model (seed 000, spec seed-methods.md §A): IRRA plus a log-sigma head per modality.

Every token of both modalities gets a diagonal Gaussian N(mu, diag(sigma^2)), sigma = exp(log_sigma)
(the std, as models/gaussian.py). mu is the tower's own output (so the dual encoder, the cross-modal
transformer, the MLM head and the ID classifier keep IRRA's parameter names and pretrained CLIP
weights load into `base_model` unchanged); only the log-sigma branch is new:

  head='block': the duplicated-last-block form of §A ("probability mapping") in its shared form
      (docs/methods_probabilistic.md §1): `LogSigmaBlock` on the input of the tower's last block,
      its body initialized from that block (`tie_logsigma_to_towers`). The mu branch of the
      duplicated head *is* the tower's last block, so nothing is duplicated.
  head='mlp':   the light form, `MLPGaussianHead` on every output token (Dense -> GELU -> Dense).

Parameters: IRRA's (base_model, cross_attn, cross_modal_transformer, ln_pre_t, ln_pre_i, ln_post,
mlm_head, classifier) + image_logsigma, text_logsigma. The new names contain none of the optimizer's
5x keys ('cross', 'classifier', 'mlm_head'): they train at the backbone lr, like the block copied.
"""
from __future__ import annotations

import math
from typing import Any

import jax

from tipr_jax.models.clip import causal_mask
from tipr_jax.models.gaussian import (DEFAULT_LOG_SIGMA_INIT, LogSigmaBlock, MLPGaussianHead,
                                      logsigma_params_from_tower, tower_parts)
from tipr_jax.models.irra import IRRA

Array = jax.Array
HEADS = ("block", "mlp")


class UCFA(IRRA):
  """IRRA + Gaussian heads. `image_distribution` / `text_distribution` give (mu, log_sigma)."""
  head: str = "block"
  log_sigma_init: float = DEFAULT_LOG_SIGMA_INIT
  omre_mlp_input: bool = False     # block head: OMRE's ResidualAttentionBlock2 body
  mlp_hidden_dim: int = 0          # mlp head: hidden width (0: embed_dim)

  def setup(self):
    super().setup()
    c = self.clip
    if self.head == "block":
      self.image_logsigma = LogSigmaBlock(
          c.vision_width, c.vision_heads, c.embed_dim, c.dtype, omre_mlp_input=self.omre_mlp_input,
          log_sigma_init=self.log_sigma_init, layers=c.vision_layers)
      self.text_logsigma = LogSigmaBlock(
          c.text_width, c.text_heads, c.embed_dim, c.dtype, omre_mlp_input=self.omre_mlp_input,
          log_sigma_init=self.log_sigma_init, layers=c.text_layers)
    elif self.head == "mlp":
      hidden = self.mlp_hidden_dim or None
      self.image_logsigma = MLPGaussianHead(hidden, c.dtype, log_sigma_init=self.log_sigma_init)
      self.text_logsigma = MLPGaussianHead(hidden, c.dtype, log_sigma_init=self.log_sigma_init)
    else:
      raise ValueError(f"config.ucfa.head must be one of {HEADS}, got {self.head!r}")

  def image_distribution(self, images: Array) -> tuple[Array, Array]:
    """images [B,H,W,3] -> (mu [B,1+N,D] compute dtype, log_sigma [B,1+N,D] float32)."""
    if self.head == "block":
      mu, hidden = self.base_model.image_tokens_and_hidden(images)
      return mu, self.image_logsigma(hidden)
    mu = self.base_model.image_tokens(images)
    return mu, self.image_logsigma(mu)[1]

  def text_distribution(self, token_ids: Array) -> tuple[Array, Array]:
    """token_ids [B,L] -> (mu [B,L,D] compute dtype, log_sigma [B,L,D] float32); causal."""
    if self.head == "block":
      mu, hidden = self.base_model.text_tokens_and_hidden(token_ids)
      return mu, self.text_logsigma(hidden, causal_mask(token_ids.shape[1]))
    mu = self.base_model.text_tokens(token_ids)
    return mu, self.text_logsigma(mu)[1]

  def __call__(self, images: Array, token_ids: Array) -> dict[str, Array]:
    """Touches every submodule (used for init)."""
    out = super().__call__(images, token_ids)
    _, ls_v = self.image_distribution(images)
    _, ls_t = self.text_distribution(token_ids)
    return dict(out, image_log_sigma=ls_v, text_log_sigma=ls_t)


def tie_logsigma_to_towers(params: dict[str, Any]) -> dict[str, Any]:
  """Copies each tower's last residual block into its LogSigmaBlock body ('out' kept).

  The §A initialization plan: the log-sigma branch starts from the (pretrained) last block. Used
  after `init` and after the pretrained CLIP weights are grafted into `base_model`. Params of the
  'mlp' head (no 'ln_1' entry) are returned unchanged.
  """
  if "ln_1" not in params.get("image_logsigma", {}):
    return params
  out = dict(params)
  for name, tower in (("image_logsigma", "visual"), ("text_logsigma", "text")):
    last, _, _ = tower_parts(params["base_model"][tower])
    out[name] = logsigma_params_from_tower(params[name], last)
  return out


def entropy_floor_log_sigma(margin: float, dim: int, exact_std_entropy: bool = False) -> float:
  """Mean log_sigma at which `entropy_margin_reg(., margin)` becomes 0 (its floor).

  H = D/2 (log 2pi + 1) + c sum log_sigma, c = 1/2 (spec) or 1 (exact): H = margin at
  log_sigma = (margin - D/2 (log 2pi + 1)) / (c D). -1.666 for margin 300, D = 512, c = 1/2.
  """
  c = 1.0 if exact_std_entropy else 0.5
  return (margin - dim / 2.0 * (math.log(2.0 * math.pi) + 1.0)) / (c * dim)
