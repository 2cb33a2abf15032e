"""CLIP building blocks and dual encoder: shapes, numerics against float64 / torch, sharding."""
from __future__ import annotations

import json

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tipr_jax.models.clip import patch_embed
from tipr_jax.models import (BlockInit, CLIPConfig, DualEncoder, LayerNorm, MultiHeadAttention,
                             ResidualAttentionBlock, Transformer, eot_pool, quick_gelu)

torch.set_num_threads(2)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def tiny():
  """(model, params, images [2,32,16,3], ids [2,16]) of CLIPConfig.tiny(), built once."""
  return init_tiny(CLIPConfig.tiny())


def init_tiny(config: CLIPConfig, batch: int = 2, length: int | None = None):
  model = DualEncoder(config)
  h, w = config.image_size
  images = jax.random.normal(jax.random.key(1), (batch, h, w, 3))
  ids = jax.random.randint(jax.random.key(2), (batch, length or config.context_length), 1,
                           config.vocab_size)
  params = jax.jit(model.init)(jax.random.key(0), images, ids)["params"]
  return model, params, images, ids


def apply(model, params, *args, method=None):
  """Jitted model.apply (op-by-op dispatch is slow on a loaded machine)."""
  return jax.jit(model.apply, static_argnames="method")({"params": params}, *args, method=method)


# --- config ---------------------------------------------------------------------------------

def test_config_presets_and_dict_round_trip():
  c = CLIPConfig.vit_b16()
  assert (c.embed_dim, c.image_size, c.patch_size, c.stride_size) == (512, (384, 128), 16, 16)
  assert (c.vision_width, c.vision_layers, c.vision_heads) == (768, 12, 12)
  assert (c.text_width, c.text_layers, c.text_heads, c.context_length, c.vocab_size) == (
      512, 12, 8, 77, 49408)
  assert c.grid_size == (24, 8) and c.num_image_tokens == 193
  assert CLIPConfig.vit_b16(image_size=(224, 224), dtype="bfloat16").grid_size == (14, 14)
  for cfg in (c, CLIPConfig.tiny(stride_size=6)):
    assert CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  with pytest.raises(ValueError, match="unknown keys.*'foo'"):
    CLIPConfig.from_dict({**c.to_dict(), "foo": 1})
  with pytest.raises(ValueError, match="compute dtype"):
    CLIPConfig.tiny(dtype="float16")


# --- layers --------------------------------------------------------------------------------

def test_quick_gelu_and_layernorm_against_float64():
  x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32) * 3 + 1
  np.testing.assert_allclose(quick_gelu(x), x / (1 + np.exp(-1.702 * x.astype(np.float64))),
                             rtol=1e-6, atol=1e-6)
  ln = LayerNorm()
  params = {"scale": np.linspace(0.5, 1.5, 16).astype(np.float32),
            "bias": np.linspace(-1, 1, 16).astype(np.float32)}
  x64 = x.astype(np.float64)
  ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
  ref = ref * params["scale"] + params["bias"]
  np.testing.assert_allclose(ln.apply({"params": params}, x), ref, rtol=1e-5, atol=1e-5)
  y = ln.apply({"params": params}, jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  # eps 1e-5 matters for small-variance inputs (Flax's default 1e-6 would not match torch).
  small = x * 1e-3
  s64 = small.astype(np.float64)
  ref_small = (s64 - s64.mean(-1, keepdims=True)) / np.sqrt(s64.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(LayerNorm().apply(
      {"params": {"scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32)}}, small),
      ref_small, rtol=1e-4, atol=1e-5)


def _torch_mha(params, d, h):
  mha = torch.nn.MultiheadAttention(d, h, batch_first=True)
  with torch.no_grad():
    mha.in_proj_weight.copy_(torch.from_numpy(np.asarray(params["in_proj_kernel"]).T.copy()))
    mha.in_proj_bias.copy_(torch.from_numpy(np.array(params["in_proj_bias"])))
    mha.out_proj.weight.copy_(torch.from_numpy(np.asarray(params["out_proj"]["kernel"]).T.copy()))
    mha.out_proj.bias.copy_(torch.from_numpy(np.array(params["out_proj"]["bias"])))
  return mha


def test_multihead_attention_self_and_cross_match_torch():
  d, h = 32, 4
  rng = np.random.default_rng(0)
  q_in = rng.standard_normal((2, 5, d)).astype(np.float32)
  kv_in = rng.standard_normal((2, 7, d)).astype(np.float32)
  mha = MultiHeadAttention(d, h)
  params = mha.init(jax.random.key(0), q_in, kv_in)["params"]
  params = jax.tree_util.tree_map(  # non-zero biases so that their mapping is checked
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params)
  ref = _torch_mha(params, d, h)
  tq, tkv = torch.from_numpy(q_in), torch.from_numpy(kv_in)
  with torch.no_grad():
    cross = ref(tq, tkv, tkv, need_weights=False)[0].numpy()
    causal = torch.full((5, 5), float("-inf")).triu(1)
    self_masked = ref(tq, tq, tq, need_weights=False, attn_mask=causal)[0].numpy()
  assert rel_err(mha.apply({"params": params}, q_in, kv_in), cross) < 1e-5
  bool_mask = np.tril(np.ones((5, 5), bool))
  assert rel_err(mha.apply({"params": params}, q_in, None, bool_mask), self_masked) < 1e-5
  additive = np.where(bool_mask, 0.0, -np.inf).astype(np.float32)
  assert rel_err(mha.apply({"params": params}, q_in, q_in, additive), self_masked) < 1e-5


def test_residual_block_matches_float64_numpy():
  d, h, L = 16, 2, 6
  x = np.random.default_rng(1).standard_normal((2, L, d)).astype(np.float32)
  blk = ResidualAttentionBlock(d, h)
  p = blk.init(jax.random.key(0), x)["params"]
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)

  def ln(v, q):
    return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5) * \
        q["scale"] + q["bias"]

  def softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)

  x64 = x.astype(np.float64)
  y = ln(x64, p["ln_1"])
  qkv = y @ p["attn"]["in_proj_kernel"] + p["attn"]["in_proj_bias"]
  q, k, v = [t.reshape(2, L, h, d // h) for t in np.split(qkv, 3, axis=-1)]
  a = softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h))
  o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(2, L, d)
  x64 = x64 + o @ p["attn"]["out_proj"]["kernel"] + p["attn"]["out_proj"]["bias"]
  y = ln(x64, p["ln_2"])
  m = y @ p["mlp"]["c_fc"]["kernel"] + p["mlp"]["c_fc"]["bias"]
  m = m / (1 + np.exp(-1.702 * m))
  x64 = x64 + m @ p["mlp"]["c_proj"]["kernel"] + p["mlp"]["c_proj"]["bias"]
  out = blk.apply({"params": jax.tree_util.tree_map(np.float32, p)}, x)
  assert rel_err(out, x64) < 1e-5


def test_block_init_stds_clip_default_and_override():
  d, layers = 256, 4
  x = jnp.zeros((1, 3, d))
  b = jax.jit(ResidualAttentionBlock(d, 4, layers=layers).init)(jax.random.key(0), x)["params"]
  expect = {"in": d ** -0.5, "out": d ** -0.5 * (2 * layers) ** -0.5, "fc": (2 * d) ** -0.5}
  assert abs(np.std(b["attn"]["in_proj_kernel"]) / expect["in"] - 1) < 0.02
  assert abs(np.std(b["attn"]["out_proj"]["kernel"]) / expect["out"] - 1) < 0.02
  assert abs(np.std(b["mlp"]["c_fc"]["kernel"]) / expect["fc"] - 1) < 0.02
  assert abs(np.std(b["mlp"]["c_proj"]["kernel"]) / expect["out"] - 1) < 0.02
  np.testing.assert_array_equal(b["attn"]["in_proj_bias"], 0)
  bound = d ** -0.5  # torch Linear default bias U(+-1/sqrt(fan_in))
  assert 0.5 * bound < np.max(np.abs(b["mlp"]["c_fc"]["bias"])) <= bound
  custom = BlockInit(attn=0.1, out=0.2, fc=0.3, proj=0.4, torch_mlp_bias=False)
  b = jax.jit(Transformer(d, 1, 4, block_init=custom).init)(jax.random.key(0), x)["params"]
  b = b["resblocks_0"]
  for got, want in [(b["attn"]["in_proj_kernel"], 0.1), (b["attn"]["out_proj"]["kernel"], 0.2),
                    (b["mlp"]["c_fc"]["kernel"], 0.3), (b["mlp"]["c_proj"]["kernel"], 0.4)]:
    assert abs(np.std(got) / want - 1) < 0.02
  np.testing.assert_array_equal(b["mlp"]["c_fc"]["bias"], 0)


# --- dual encoder ---------------------------------------------------------------------------

def test_dual_encoder_outputs_and_param_tree(tiny):
  model, params, images, ids = tiny
  config = model.config
  assert set(params) == {"visual", "text"}
  paths = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert not [p for p in paths if any(s in p for s in ("cross", "classifier", "mlm_head"))]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))

  @jax.jit
  def run(params, images, ids):
    v = {"params": params}
    return (model.apply(v, images, ids), model.apply(v, images, method="encode_image"),
            model.apply(v, ids, method="encode_text"),
            model.apply(v, images, method="image_tokens"))

  out, enc_img, enc_txt, img_tok = run(params, images, ids)
  gh, gw = config.grid_size
  assert out["image_tokens"].shape == (2, 1 + gh * gw, config.embed_dim)
  assert out["text_tokens"].shape == (2, config.context_length, config.embed_dim)
  assert out["image_feats"].shape == out["text_feats"].shape == (2, config.embed_dim)
  np.testing.assert_array_equal(out["image_feats"], out["image_tokens"][:, 0])
  np.testing.assert_array_equal(out["text_feats"],
                                out["text_tokens"][np.arange(2), np.argmax(ids, -1)])
  np.testing.assert_allclose(enc_img, out["image_feats"], rtol=1e-6)
  np.testing.assert_allclose(enc_txt, out["text_feats"], rtol=1e-6)
  np.testing.assert_allclose(img_tok, out["image_tokens"], rtol=1e-6)
  with pytest.raises(ValueError, match="images must be"):
    jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method="encode_image"),
                   params, images[:, :16])


def test_text_is_causal_and_accepts_shorter_captions(tiny):
  model, params, _, ids = tiny
  tok = apply(model, params, ids, method="text_tokens")
  changed = ids.at[:, 9:].set(7)
  tok2 = apply(model, params, changed, method="text_tokens")
  np.testing.assert_array_equal(tok[:, :9], tok2[:, :9])
  assert not np.allclose(tok[:, 9:], tok2[:, 9:])
  short = apply(model, params, ids[:, :10], method="text_tokens")
  np.testing.assert_allclose(short, tok[:, :10], rtol=1e-5, atol=1e-6)


def test_patch_embedding_matmul_equals_convolution():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 36, 20, 3)).astype(np.float32)  # not multiples of 8: cropped
  kernel = rng.standard_normal((8, 8, 3, 16)).astype(np.float32)
  fast = patch_embed(images, kernel, 8)
  conv = patch_embed(images, kernel, 8, force_conv=True)
  assert fast.shape == conv.shape == (2, 4 * 2, 16)
  assert rel_err(fast, conv) < 1e-5
  # Hand check of one patch: row 1, column 1 of the grid is token 1 * 2 + 1.
  patch = images[0, 8:16, 8:16, :].astype(np.float64)
  np.testing.assert_allclose(fast[0, 3], np.einsum("hwc,hwcd->d", patch, kernel), rtol=1e-4,
                             atol=1e-4)
  overlap = patch_embed(images, kernel, 4)
  assert overlap.shape == (2, 8 * 4, 16)
  patch = images[1, 4:12, 12:20, :].astype(np.float64)  # grid (1, 3) with stride 4
  np.testing.assert_allclose(overlap[1, 1 * 4 + 3], np.einsum("hwc,hwcd->d", patch, kernel),
                             rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_close_to_float32(tiny):
  model, params, images, ids = tiny
  both = jax.jit(lambda p, x, t: (
      model.apply({"params": p}, x, t),
      DualEncoder(model.config.replace(dtype="bfloat16")).apply({"params": p}, x, t)))
  f32, bf = both(params, images, ids)
  assert bf["image_tokens"].dtype == jnp.bfloat16
  assert bf["image_feats"].dtype == bf["text_feats"].dtype == jnp.float32
  for k in ("image_feats", "text_feats"):
    assert rel_err(bf[k], f32[k]) < 5e-2, k


def test_eot_pool_under_explicit_mesh_and_sharded_model(tiny):
  n = len(jax.devices())
  assert n == 8, "conftest gives 8 CPU devices"
  mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Explicit,))
  rng = np.random.default_rng(0)
  tokens = rng.standard_normal((n, 6, 4)).astype(np.float32)
  ids = rng.integers(0, 50, (n, 6)).astype(np.int32)
  model, params, _, _ = tiny
  images = rng.standard_normal((n, 32, 16, 3)).astype(np.float32)
  full_ids = rng.integers(1, 999, (n, 16)).astype(np.int32)
  ref = apply(model, params, images, full_ids)
  with jax.set_mesh(mesh):
    shard = NamedSharding(mesh, P("data"))
    pooled = jax.jit(eot_pool)(jax.device_put(tokens, shard), jax.device_put(ids, shard))
    assert pooled.sharding.spec[0] == "data"
    out = jax.jit(model.apply)({"params": params}, jax.device_put(np.asarray(images), shard),
                               jax.device_put(full_ids, shard))
    assert out["text_feats"].sharding.spec[0] == "data"
  np.testing.assert_array_equal(pooled, tokens[np.arange(n), ids.argmax(-1)])
  for k in ref:
    assert rel_err(out[k], ref[k]) < 1e-5, k
