"""Tests for tipr_jax.models.part_decoder (shared part-query decoder)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tipr_jax.models.part_decoder import PartDecoder, text_padding_mask

D, NQ, H = 16, 4, 2


def _ids(b=2, l=9):
  ids = np.zeros((b, l), np.int64)
  ids[0, :4] = [49406, 320, 1125, 49407]
  ids[1, :6] = [49406, 320, 1125, 539, 2866, 49407]
  return ids


def _init(module, seed=0, b=2, lv=7, l=9, randomize=True):
  rng = np.random.default_rng(seed)
  img = rng.normal(size=(b, lv, D)).astype(np.float32)
  txt = rng.normal(size=(b, l, D)).astype(np.float32)
  ids = _ids(b, l)
  glob = rng.normal(size=(b, D)).astype(np.float32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(seed), img, txt, text_padding_mask(ids), glob)
  if randomize:  # LN scales/biases start equal for both modalities: make every param distinct
    leaves, tree = jax.tree_util.tree_flatten(variables)
    leaves = [l + 0.3 * rng.normal(size=l.shape).astype(np.float32) for l in leaves]
    variables = jax.tree_util.tree_unflatten(tree, leaves)
  return variables, img, txt, ids, glob


def np_ln(x, p):
  x = x.astype(np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_decode(params, tokens, ln_name, mask):
  """Float64 re-derivation for layers=0: ln_post(cross_attn(ln_q(Q), ln_m(X))), per sample/head."""
  w = np.asarray(params["cross_attn"]["in_proj_kernel"], np.float64)
  bias = np.asarray(params["cross_attn"]["in_proj_bias"], np.float64)
  wo = np.asarray(params["cross_attn"]["out_proj"]["kernel"], np.float64)
  bo = np.asarray(params["cross_attn"]["out_proj"]["bias"], np.float64)
  q = np_ln(np.asarray(params["part_queries"]), params["ln_q"])
  dh = D // H
  out = np.zeros((tokens.shape[0], NQ, D))
  for b in range(tokens.shape[0]):
    kv = np_ln(tokens[b], params[ln_name])
    qq = q @ w[:, :D] + bias[:D]
    kk = kv @ w[:, D:2 * D] + bias[D:2 * D]
    vv = kv @ w[:, 2 * D:] + bias[2 * D:]
    heads = []
    for h in range(H):
      sl = slice(h * dh, (h + 1) * dh)
      logits = (qq[:, sl] / np.sqrt(dh)) @ kk[:, sl].T
      keep = np.ones(tokens.shape[1], bool) if mask is None else mask[b]
      logits = np.where(keep[None, :], logits, -np.inf)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      heads.append(p @ vv[:, sl])
    x = np.concatenate(heads, -1) @ wo + bo
    out[b] = np_ln(x, params["ln_post"])
  return out


def test_forward_matches_numpy_rederivation():
  module = PartDecoder(width=D, num_queries=NQ, heads=H, layers=0)
  variables, img, txt, ids, glob = _init(module)
  p = variables["params"]
  out = jax.jit(module.apply)(variables, img, txt, text_padding_mask(ids), glob)
  np.testing.assert_allclose(np.asarray(out["image_parts"]), np_decode(p, img, "ln_image", None),
                             rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(np.asarray(out["text_parts"]),
                             np_decode(p, txt, "ln_text", ids != 0), rtol=2e-4, atol=2e-5)
  h = np.maximum(glob @ np.asarray(p["weight_fc1"]["kernel"]) + np.asarray(p["weight_fc1"]["bias"]), 0)
  logits = h @ np.asarray(p["weight_fc2"]["kernel"]) + np.asarray(p["weight_fc2"]["bias"])
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(out["part_weights"]), want, rtol=1e-5, atol=1e-7)
  # the modality LNs matter (the parity above would fail with the other modality's LN)
  assert np.max(np.abs(np_decode(p, txt, "ln_image", ids != 0) - np.asarray(out["text_parts"]))) > 1e-2


def test_padding_tokens_do_not_change_outputs():
  module = PartDecoder(width=D, num_queries=NQ, heads=H, layers=2)
  variables, img, txt, ids, _ = _init(module)
  mask = text_padding_mask(ids)
  enc = jax.jit(lambda t, m: module.apply(variables, t, m, method=PartDecoder.encode_text))
  ref = np.asarray(enc(txt, mask))
  changed = txt.copy()
  changed[ids == 0] = 100.0 * np.random.default_rng(1).normal(size=(int((ids == 0).sum()), D))
  np.testing.assert_array_equal(np.asarray(enc(changed, mask)), ref)
  # ...but they do when not masked, and a real token always does
  all_true = jnp.ones(ids.shape, bool)
  assert np.max(np.abs(np.asarray(enc(changed, all_true)) - np.asarray(enc(txt, all_true)))) > 1e-3
  real = txt.copy()
  real[0, 2] += np.random.default_rng(2).normal(size=D).astype(np.float32)  # not a shift: LN removes those
  assert np.max(np.abs(np.asarray(enc(real, mask))[0] - ref[0])) > 1e-4
  np.testing.assert_array_equal(np.asarray(enc(real, mask))[1], ref[1])  # samples independent


def test_queries_and_layers_shared_across_modalities():
  module = PartDecoder(width=D, num_queries=NQ, heads=H, layers=1)
  variables, img, txt, ids, _ = _init(module)
  p = variables["params"]
  assert set(p) == {"part_queries", "ln_q", "ln_image", "ln_text", "cross_attn", "decoder",
                    "ln_post", "weight_fc1", "weight_fc2"}
  assert p["part_queries"].shape == (NQ, D)
  # with equal modality LNs, the two paths are the same function of the tokens
  same_ln = jax.tree_util.tree_map(lambda x: x, variables)
  same_ln["params"]["ln_text"] = same_ln["params"]["ln_image"]
  full = jnp.ones(txt.shape[:2], bool)
  a = module.apply(same_ln, txt, method=PartDecoder.encode_image)
  b = module.apply(same_ln, txt, full, method=PartDecoder.encode_text)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  # both modalities depend on (and send gradients to) the same queries
  mask = text_padding_mask(ids)

  def part_sums(params):
    v = {"params": params}
    return (jnp.sum(module.apply(v, img, method=PartDecoder.encode_image) ** 3),
            jnp.sum(module.apply(v, txt, mask, method=PartDecoder.encode_text) ** 3))

  g_img = jax.jit(jax.grad(lambda q: part_sums(q)[0]))(p)
  g_txt = jax.jit(jax.grad(lambda q: part_sums(q)[1]))(p)
  for g in (g_img, g_txt):
    assert np.max(np.abs(np.asarray(g["part_queries"]))) > 0
    assert np.max(np.abs(np.asarray(g["cross_attn"]["in_proj_kernel"]))) > 0
  assert np.all(np.asarray(g_img["ln_text"]["scale"]) == 0)
  assert np.all(np.asarray(g_txt["ln_image"]["scale"]) == 0)


def test_full_size_shapes_bfloat16():
  module = PartDecoder(width=64, num_queries=8, heads=2, layers=1, dtype="bfloat16")
  rng = np.random.default_rng(2)
  img = rng.normal(size=(2, 193, 64)).astype(np.float32)
  txt = rng.normal(size=(2, 77, 64)).astype(np.float32)
  ids = np.zeros((2, 77), np.int64)
  ids[:, :5] = [49406, 1, 2, 3, 49407]
  glob = rng.normal(size=(2, 64)).astype(np.float32)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), img, txt, text_padding_mask(ids), glob)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  out = jax.jit(module.apply)(variables, img, txt, text_padding_mask(ids), glob)
  assert out["image_parts"].shape == (2, 8, 64) and out["text_parts"].shape == (2, 8, 64)
  assert out["part_weights"].shape == (2, 8)
  for v in out.values():
    assert v.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(v)))
  np.testing.assert_allclose(np.asarray(out["part_weights"]).sum(-1), 1.0, rtol=1e-6)


def test_text_padding_mask():
  ids = _ids()
  np.testing.assert_array_equal(np.asarray(text_padding_mask(ids)), ids != 0)
  ex = np.asarray(text_padding_mask(ids, exclude_special=True))
  np.testing.assert_array_equal(ex[0], [False, True, True] + [False] * 6)


def test_bad_input():
  module = PartDecoder(width=D, num_queries=NQ, heads=H, layers=0)
  variables, img, txt, ids, glob = _init(module, randomize=False)
  with pytest.raises(ValueError, match="text_global"):
    module.apply(variables, img, txt, text_padding_mask(ids))
  with pytest.raises(ValueError, match="tokens must be"):
    module.apply(variables, img[..., :8], method=PartDecoder.encode_image)
  with pytest.raises(ValueError, match="mask must have shape"):
    module.apply(variables, txt, text_padding_mask(ids)[:, :3], method=PartDecoder.encode_text)
  no_w = PartDecoder(width=D, num_queries=NQ, heads=H, layers=0, predict_weights=False)
  v2 = no_w.init(jax.random.PRNGKey(0), img, txt, text_padding_mask(ids))
  assert "weight_fc1" not in v2["params"]
  with pytest.raises(ValueError, match="predict_weights"):
    no_w.apply(v2, glob, method=PartDecoder.part_weights)
