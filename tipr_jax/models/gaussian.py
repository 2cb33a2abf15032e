"""Gaussian embedding heads for the probabilistic methods (UCFA, spec seed-methods.md §A).

Every token of a modality gets a diagonal Gaussian N(mu, diag(sigma^2)) with
sigma = exp(log_sigma) (the STD, as in OMRE; not exp(log_sigma / 2)).

Two head forms:
- `DuplicatedBlockGaussianHead` (OMRE's "probability mapping"): the tower's last
  residual block is duplicated. mu branch = block -> final LN -> projection (the
  tower's own output path); log-sigma branch = `LogSigmaBlock` = attention + MLP
  + Linear(width -> embed_dim), no LN, no projection. Both read the hidden
  states BEFORE the tower's last block, [B,L,width]. Both branches are
  initialized from the pretrained last block (and the mu branch's LN/projection
  from the tower's) with `duplicated_head_params_from_tower`.
  Equivalent shared form (recommended for integration, no duplicated weights):
  keep the tower as is, mu = the tower's normal output, and apply only
  `LogSigmaBlock` to the tower's hidden states before its last block
  (initialized with `logsigma_params_from_tower`). It computes the same thing as
  the duplicated head whose mu branch *is* the tower's last block.
- `MLPGaussianHead` (light): mu = the deterministic feature, log_sigma =
  Dense -> GELU -> Dense(feature), last layer zero kernel + constant bias.

`sample_gaussian` draws reparameterized samples [K, ...] from an explicit key.

Module names avoid 'cross', 'classifier' and 'mlm_head', so the IRRA optimizer's
5x learning-rate rules do NOT apply: the duplicated block starts from pretrained
weights and trains at the backbone lr like the block it copies. The randomly
initialized output layers ('logsigma/out', the MLP head) also get the base lr
unless the optimizer adds a rule for them.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tipr_jax.models.layers import (MLP, BlockInit, LayerNorm, MultiHeadAttention,
                                    ResidualAttentionBlock, compute_dtype)

Array = jax.Array
Params = Mapping[str, Any]

DEFAULT_LOG_SIGMA_INIT = -4.0  # sigma = 0.018: training starts near-deterministic


def _out_init(std: float):
  return nn.initializers.zeros if std == 0.0 else nn.initializers.normal(std)


class LogSigmaBlock(nn.Module):
  """log-sigma branch: a copy of a CLIP residual block, then Dense(width -> embed_dim).

  hidden [B,L,width] (the tower's states before its last block), mask as for the
  tower's blocks (causal for text) -> log_sigma [B,L,embed_dim] float32.
  omre_mlp_input=False: h = a full residual block (x1 = x + attn(ln_1 x);
    h = x1 + mlp(ln_2 x1)), i.e. exactly the copied last block, then the Dense.
  omre_mlp_input=True: OMRE's ResidualAttentionBlock2, h = mlp(x + ln_2(x1)) (no
    residual after the MLP; its input mixes the block input with ln_2 of x1).
  Param names ln_1/attn/ln_2/mlp match `ResidualAttentionBlock`, so a
  pretrained block's params load 1:1; 'out' is the new output layer (zero
  kernel and constant bias `log_sigma_init` unless out_kernel_std > 0).
  `layers` only sets CLIP's random-init stds (used when not loaded).
  """
  width: int
  heads: int
  embed_dim: int
  dtype: Any = "float32"
  omre_mlp_input: bool = False
  log_sigma_init: float = DEFAULT_LOG_SIGMA_INIT
  out_kernel_std: float = 0.0
  layers: int = 12

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None = None) -> Array:
    if hidden.ndim != 3 or hidden.shape[-1] != self.width:
      raise ValueError(f"LogSigmaBlock: hidden must be [B,L,{self.width}], got {hidden.shape}")
    dt = compute_dtype(self.dtype)
    ini = BlockInit().resolve(self.width, self.layers)
    x = hidden.astype(dt)
    y = LayerNorm(name="ln_1")(x)
    x1 = x + MultiHeadAttention(self.width, self.heads, self.dtype, attn_std=ini.attn,
                                out_std=ini.out, name="attn")(y, y, mask)
    y1 = LayerNorm(name="ln_2")(x1)
    mlp = MLP(self.width, self.dtype, fc_std=ini.fc, proj_std=ini.proj,
              torch_bias=ini.torch_mlp_bias, name="mlp")
    h = mlp(x + y1) if self.omre_mlp_input else x1 + mlp(y1)
    out = nn.Dense(self.embed_dim, dtype=jnp.float32, param_dtype=jnp.float32, name="out",
                   kernel_init=_out_init(self.out_kernel_std),
                   bias_init=nn.initializers.constant(self.log_sigma_init))
    return out(h.astype(jnp.float32))


class DuplicatedBlockGaussianHead(nn.Module):
  """Duplicated-last-block Gaussian head (spec §A, OMRE): -> (mu, log_sigma).

  hidden [B,L,width]: the tower's states before its last block; mask: the
  tower's attention mask (causal for text, None for images).
  mu = LN(mu_block(hidden)) @ proj   [B,L,embed_dim], compute dtype
  log_sigma = LogSigmaBlock(hidden)  [B,L,embed_dim], float32
  Owns copies of the last block ('mu_block'), the final LN ('ln_post') and the
  projection ('proj'): load them with `duplicated_head_params_from_tower`.
  Global features: [:, 0] for images, `eot_pool` for text (on both outputs).
  """
  width: int
  heads: int
  embed_dim: int
  dtype: Any = "float32"
  omre_mlp_input: bool = False
  log_sigma_init: float = DEFAULT_LOG_SIGMA_INIT
  out_kernel_std: float = 0.0
  layers: int = 12

  @nn.compact
  def __call__(self, hidden: Array, mask: Array | None = None) -> tuple[Array, Array]:
    if hidden.ndim != 3 or hidden.shape[-1] != self.width:
      raise ValueError(f"DuplicatedBlockGaussianHead: hidden must be [B,L,{self.width}], "
                       f"got {hidden.shape}")
    dt = compute_dtype(self.dtype)
    h = ResidualAttentionBlock(self.width, self.heads, self.dtype, layers=self.layers,
                               name="mu_block")(hidden, mask)
    h = LayerNorm(name="ln_post")(h)
    proj = self.param("proj", nn.initializers.normal(self.width ** -0.5),
                      (self.width, self.embed_dim), jnp.float32)
    mu = h @ proj.astype(dt)
    log_sigma = LogSigmaBlock(self.width, self.heads, self.embed_dim, self.dtype,
                              omre_mlp_input=self.omre_mlp_input,
                              log_sigma_init=self.log_sigma_init,
                              out_kernel_std=self.out_kernel_std, layers=self.layers,
                              name="logsigma")(hidden, mask)
    return mu, log_sigma


class MLPGaussianHead(nn.Module):
  """Light head: mu = feats, log_sigma = Dense(hidden) -> GELU -> Dense(D).

  feats [..., D] (global features or token features) -> (mu [..., D] = feats,
  log_sigma [..., D] float32). The last Dense starts with a zero kernel (or
  N(0, out_kernel_std)) and bias `log_sigma_init`, so sigma starts small and
  uniform. stop_gradient_input=True keeps the variance head from moving the
  backbone (log_sigma gets no gradient path into feats).
  """
  hidden_dim: int | None = None  # None: D
  dtype: Any = "float32"
  log_sigma_init: float = DEFAULT_LOG_SIGMA_INIT
  out_kernel_std: float = 0.0
  stop_gradient_input: bool = False

  @nn.compact
  def __call__(self, feats: Array) -> tuple[Array, Array]:
    dt = compute_dtype(self.dtype)
    d = feats.shape[-1]
    x = jax.lax.stop_gradient(feats) if self.stop_gradient_input else feats
    x = nn.Dense(self.hidden_dim or d, dtype=dt, param_dtype=jnp.float32, name="fc1")(
        x.astype(dt))
    x = nn.gelu(x)
    log_sigma = nn.Dense(d, dtype=jnp.float32, param_dtype=jnp.float32, name="fc2",
                         kernel_init=_out_init(self.out_kernel_std),
                         bias_init=nn.initializers.constant(self.log_sigma_init))(
                             x.astype(jnp.float32))
    return feats, log_sigma


def sample_gaussian(mu: Array, log_sigma: Array, rng: Array, num_samples: int) -> Array:
  """Reparameterized samples z^k = mu + exp(log_sigma) * eps^k: [num_samples, *mu.shape].

  eps ~ N(0, I) drawn from `rng` (explicit key); computed in at least float32.
  Gradients flow to mu (identity) and log_sigma (exp(log_sigma) * eps).
  """
  if num_samples < 1:
    raise ValueError(f"sample_gaussian: num_samples must be >= 1, got {num_samples}")
  dt = jnp.promote_types(jnp.result_type(mu, log_sigma), jnp.float32)
  shape = jnp.broadcast_shapes(mu.shape, log_sigma.shape)
  eps = jax.random.normal(rng, (num_samples,) + shape, dt)
  return mu.astype(dt)[None] + jnp.exp(log_sigma.astype(dt))[None] * eps


# ----------------------------------------------------------------------------
# initialization from a pretrained tower
# ----------------------------------------------------------------------------


def _copy(tree: Params) -> dict:
  """Fresh buffers (no aliasing with the tower: donated train states need distinct buffers)."""
  return jax.tree_util.tree_map(lambda v: jnp.array(v, copy=True), dict(tree))


def _check_same_structure(name: str, got: Params, want: Params) -> None:
  gs = jax.tree_util.tree_map(lambda a: tuple(a.shape), dict(got))  # arrays or ShapeDtypeStructs
  ws = jax.tree_util.tree_map(lambda a: tuple(a.shape), dict(want))
  if jax.tree_util.tree_structure(gs) != jax.tree_util.tree_structure(ws) or gs != ws:
    raise ValueError(f"{name}: expected param shapes {ws}, got {gs}")


def tower_parts(tower_params: Params) -> tuple[Params, Params, Array]:
  """(last block params, final LN params, projection) of a CLIP tower's params.

  tower_params: params['visual'] (keys transformer/resblocks_i, ln_post, proj)
  or params['text'] (transformer/resblocks_i, ln_final, text_projection).
  """
  if "transformer" not in tower_params:
    raise ValueError(f"tower params need a 'transformer' entry, got keys {sorted(tower_params)}")
  blocks = [k for k in tower_params["transformer"] if k.startswith("resblocks_")]
  if not blocks:
    raise ValueError("tower params: no 'transformer/resblocks_i' entries")
  last = tower_params["transformer"][max(blocks, key=lambda k: int(k.split("_")[1]))]
  if "proj" in tower_params and "ln_post" in tower_params:
    return last, tower_params["ln_post"], tower_params["proj"]
  if "text_projection" in tower_params and "ln_final" in tower_params:
    return last, tower_params["ln_final"], tower_params["text_projection"]
  raise ValueError("tower params: expected ('ln_post', 'proj') for the image tower or "
                   "('ln_final', 'text_projection') for the text tower, got "
                   f"{sorted(tower_params)}")


def logsigma_params_from_tower(logsigma_params: Params, last_block: Params) -> dict:
  """LogSigmaBlock params with ln_1/attn/ln_2/mlp copied from `last_block` ('out' kept)."""
  body = {k: v for k, v in logsigma_params.items() if k != "out"}
  _check_same_structure("logsigma block vs tower last block", last_block, body)
  return {**_copy(last_block), "out": logsigma_params["out"]}


def duplicated_head_params_from_tower(head_params: Params, tower_params: Params) -> dict:
  """DuplicatedBlockGaussianHead params initialized from a pretrained tower.

  mu_block and the log-sigma block's body <- the tower's last block; ln_post <-
  the tower's final LN; proj <- its projection; logsigma/out keeps its init.
  """
  last, ln, proj = tower_parts(tower_params)
  _check_same_structure("mu_block vs tower last block", last, head_params["mu_block"])
  _check_same_structure("ln_post vs tower final LN", ln, head_params["ln_post"])
  if tuple(proj.shape) != tuple(head_params["proj"].shape):
    raise ValueError(f"proj: expected shape {tuple(head_params['proj'].shape)}, "
                     f"got {tuple(proj.shape)}")
  return {"mu_block": _copy(last), "ln_post": _copy(ln), "proj": jnp.array(proj, copy=True),
          "logsigma": logsigma_params_from_tower(head_params["logsigma"], last)}
