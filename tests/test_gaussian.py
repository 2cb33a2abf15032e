"""Tests of tipr_jax.models.gaussian: heads vs float64 numpy, init from towers, sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tipr_jax.models import gaussian as g
from tipr_jax.models.clip import CLIPConfig, TextTransformer, VisionTransformer, causal_mask


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# ----------------------------------------------------------------------------
# numpy float64 re-derivation of a CLIP block (torch nn.MultiheadAttention semantics)
# ----------------------------------------------------------------------------


def np_ln(x, p):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_dense(x, p):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def np_mha(x, p, heads, mask=None):
  b, l, d = x.shape
  dh = d // heads
  qkv = x @ np.asarray(p["in_proj_kernel"], np.float64) + np.asarray(p["in_proj_bias"])
  q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
  out = np.zeros_like(x)
  for bi in range(b):
    for h in range(heads):
      sl = slice(h * dh, (h + 1) * dh)
      logits = q[bi, :, sl] @ k[bi, :, sl].T / np.sqrt(dh)
      if mask is not None:
        logits = np.where(mask, logits, -np.inf)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[bi, :, sl] = w @ v[bi, :, sl]
  return np_dense(out, p["out_proj"])


def np_mlp(x, p):
  h = np_dense(x, p["c_fc"])
  h = h / (1 + np.exp(-1.702 * h))
  return np_dense(h, p["c_proj"])


def np_block(x, p, heads, mask=None):
  x1 = x + np_mha(np_ln(x, p["ln_1"]), p["attn"], heads, mask)
  return x1 + np_mlp(np_ln(x1, p["ln_2"]), p["mlp"])


def np_logsigma(x, p, heads, omre, mask=None):
  x1 = x + np_mha(np_ln(x, p["ln_1"]), p["attn"], heads, mask)
  h = np_mlp(x + np_ln(x1, p["ln_2"]), p["mlp"]) if omre else x1 + np_mlp(np_ln(x1, p["ln_2"]),
                                                                          p["mlp"])
  return np_dense(h, p["out"])


def _randomize(params, seed, scale=0.3):
  """Perturbs every leaf (so LN scales, biases and the zero-init out layer are exercised)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  new = [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tree, new)


def _np(t):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), t)


# ----------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------


def test_sample_gaussian_statistics():
  mu = jnp.asarray([[0.5, -1.0, 2.0], [0.0, 3.0, -0.2]])
  ls = jnp.asarray([[-1.0, 0.0, 0.5], [-3.0, -0.5, 0.2]])
  n = 40000
  z = np.asarray(jax.jit(g.sample_gaussian, static_argnums=3)(mu, ls, jax.random.PRNGKey(0), n))
  assert z.shape == (n, 2, 3)
  std = np.exp(np.asarray(ls))  # the std is exp(log_sigma), not exp(log_sigma / 2)
  assert np.all(np.abs(z.mean(0) - np.asarray(mu)) < 5 * std / np.sqrt(n))
  np.testing.assert_allclose(z.std(0), std, rtol=0.03)


def test_sample_gaussian_key_determinism_and_vanishing_sigma():
  mu = jnp.ones((4, 5))
  ls = jnp.zeros((4, 5))
  a = g.sample_gaussian(mu, ls, jax.random.PRNGKey(1), 3)
  b = g.sample_gaussian(mu, ls, jax.random.PRNGKey(1), 3)
  c = g.sample_gaussian(mu, ls, jax.random.PRNGKey(2), 3)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))
  assert not np.allclose(np.asarray(a[0]), np.asarray(a[1]))  # the K samples differ
  tiny = g.sample_gaussian(mu, jnp.full((4, 5), -30.0), jax.random.PRNGKey(1), 3)
  np.testing.assert_allclose(np.asarray(tiny), 1.0, atol=1e-12)
  with pytest.raises(ValueError, match="num_samples"):
    g.sample_gaussian(mu, ls, jax.random.PRNGKey(1), 0)


def test_sample_gaussian_reparameterization_gradients(x64):
  mu = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)))
  ls = jnp.asarray(0.3 * np.random.default_rng(1).standard_normal((3, 4)))
  key = jax.random.PRNGKey(3)
  eps = (g.sample_gaussian(jnp.zeros((3, 4)), jnp.zeros((3, 4)), key, 2))  # the raw noise
  w = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 4)))
  f = lambda m, s: jnp.sum(w * g.sample_gaussian(m, s, key, 2))  # noqa: E731
  gm, gs = jax.grad(f, argnums=(0, 1))(mu, ls)
  np.testing.assert_allclose(np.asarray(gm), np.asarray(w.sum(0)), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(gs), np.asarray(jnp.sum(w * eps, 0) * jnp.exp(ls)),
                             rtol=1e-12)


# ----------------------------------------------------------------------------
# LogSigmaBlock / DuplicatedBlockGaussianHead vs numpy
# ----------------------------------------------------------------------------


# The layers compute in float32 (compute_dtype allows float32/bfloat16 only), so the module
# tests compare float32 outputs with the float64 numpy re-derivation at float32 tolerances.
RTOL, ATOL = 2e-5, 2e-5


@pytest.mark.parametrize("omre,causal", [(False, False), (True, True)])
def test_logsigma_block_matches_numpy(omre, causal):
  width, heads, emb, b, l = 16, 4, 8, 2, 5
  mod = g.LogSigmaBlock(width, heads, emb, omre_mlp_input=omre, layers=2)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((b, l, width)), jnp.float32)
  mask = causal_mask(l) if causal else None
  params = _randomize(jax.jit(mod.init)(jax.random.PRNGKey(0), x, mask)["params"], 5)
  got = jax.jit(mod.apply)({"params": params}, x, mask)
  want = np_logsigma(np.asarray(x), _np(params), heads, omre,
                     None if mask is None else np.asarray(mask))
  assert got.dtype == jnp.float32 and got.shape == (b, l, emb)
  np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def test_logsigma_block_init_is_constant_and_names_match_residual_block():
  width, heads, emb = 16, 4, 8
  mod = g.LogSigmaBlock(width, heads, emb, log_sigma_init=-3.0)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, width))
  params = jax.jit(mod.init)(jax.random.PRNGKey(0), x)["params"]
  np.testing.assert_array_equal(np.asarray(jax.jit(mod.apply)({"params": params}, x)), -3.0)
  from tipr_jax.models.layers import ResidualAttentionBlock
  block = jax.eval_shape(ResidualAttentionBlock(width, heads).init, jax.random.PRNGKey(0),
                         x)["params"]
  body = {k: v for k, v in params.items() if k != "out"}
  assert jax.tree_util.tree_structure(body) == jax.tree_util.tree_structure(block)
  assert jax.tree_util.tree_map(jnp.shape, body) == jax.tree_util.tree_map(jnp.shape, block)


@pytest.mark.parametrize("omre", [False, True])
def test_duplicated_head_matches_numpy(omre):
  width, heads, emb, b, l = 16, 2, 8, 2, 4
  mod = g.DuplicatedBlockGaussianHead(width, heads, emb, omre_mlp_input=omre, layers=2)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((b, l, width)), jnp.float32)
  mask = causal_mask(l)
  params = _randomize(jax.jit(mod.init)(jax.random.PRNGKey(0), x, mask)["params"], 7)
  mu, ls = jax.jit(mod.apply)({"params": params}, x, mask)
  p = _np(params)
  want_mu = np_ln(np_block(np.asarray(x), p["mu_block"], heads, np.asarray(mask)),
                  p["ln_post"]) @ p["proj"]
  want_ls = np_logsigma(np.asarray(x), p["logsigma"], heads, omre, np.asarray(mask))
  np.testing.assert_allclose(np.asarray(mu), want_mu, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.asarray(ls), want_ls, rtol=RTOL, atol=ATOL)


def test_heads_reject_wrong_width():
  mod = g.DuplicatedBlockGaussianHead(16, 2, 8)
  with pytest.raises(ValueError, match=r"\[B,L,16\]"):
    mod.init(jax.random.PRNGKey(0), jnp.zeros((2, 4, 12)))
  with pytest.raises(ValueError, match=r"\[B,L,16\]"):
    g.LogSigmaBlock(16, 2, 8).init(jax.random.PRNGKey(0), jnp.zeros((2, 16)))


# ----------------------------------------------------------------------------
# initialization from a pretrained tower: mu reproduces the tower's output
# ----------------------------------------------------------------------------


def _tower_with_block_outputs(tower, params, inputs, layers):
  """The tower's output plus the outputs of its blocks L-2 (= the input of the last block)
  and L-1 (the last block), captured as Flax intermediates (no hook needed in the tower)."""
  names = (f"resblocks_{layers - 2}", f"resblocks_{layers - 1}")

  @jax.jit
  def run(params, inputs):
    out, state = tower.apply({"params": params}, inputs, mutable=["intermediates"],
                             capture_intermediates=lambda m, n: m.name in names and
                             n == "__call__")
    inter = state["intermediates"]["transformer"]
    return out, inter[names[0]]["__call__"][0], inter[names[1]]["__call__"][0]

  return run(params, inputs)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_head_initialized_from_tower_reproduces_tower_output(modality):
  cfg = CLIPConfig.tiny(vision_layers=3, text_layers=3)
  if modality == "image":
    tower = VisionTransformer(cfg)
    inputs = jax.random.normal(jax.random.PRNGKey(0), (2, *cfg.image_size, 3))
    width, heads, layers, mask = cfg.vision_width, cfg.vision_heads, cfg.vision_layers, None
  else:
    tower = TextTransformer(cfg)
    inputs = jax.random.randint(jax.random.PRNGKey(0), (2, cfg.context_length), 1,
                                cfg.vocab_size)
    width, heads, layers = cfg.text_width, cfg.text_heads, cfg.text_layers
    mask = causal_mask(cfg.context_length)
  tparams = jax.jit(tower.init)(jax.random.PRNGKey(1), inputs)["params"]
  tokens, hidden, last = _tower_with_block_outputs(tower, tparams, inputs, layers)
  head = g.DuplicatedBlockGaussianHead(width, heads, cfg.embed_dim, layers=layers,
                                       out_kernel_std=0.02)
  hparams = jax.jit(head.init)(jax.random.PRNGKey(2), hidden, mask)["params"]
  loaded = g.duplicated_head_params_from_tower(hparams, tparams)
  mu, ls = jax.jit(head.apply)({"params": loaded}, hidden, mask)
  np.testing.assert_allclose(np.asarray(mu), np.asarray(tokens), rtol=1e-5, atol=1e-5)
  # The log-sigma body is the same last block: log_sigma = last_block_out @ W + b.
  out = loaded["logsigma"]["out"]
  np.testing.assert_allclose(np.asarray(ls), np.asarray(last @ out["kernel"] + out["bias"]),
                             rtol=1e-5, atol=1e-5)
  # Fresh buffers, not aliases of the tower's (donation-safe).
  last_p = tparams["transformer"][f"resblocks_{layers - 1}"]
  assert loaded["mu_block"]["mlp"]["c_fc"]["kernel"] is not last_p["mlp"]["c_fc"]["kernel"]
  # The shared form: LogSigmaBlock alone with logsigma_params_from_tower gives the same log_sigma.
  alone = g.LogSigmaBlock(width, heads, cfg.embed_dim, layers=layers)
  lp = g.logsigma_params_from_tower(hparams["logsigma"], last_p)
  np.testing.assert_allclose(np.asarray(jax.jit(alone.apply)({"params": lp}, hidden, mask)),
                             np.asarray(ls), rtol=1e-6, atol=1e-6)


def test_params_from_tower_errors_name_the_mismatch():
  cfg = CLIPConfig.tiny()
  tower = VisionTransformer(cfg)
  img = jnp.zeros((1, *cfg.image_size, 3))
  tparams = jax.eval_shape(tower.init, jax.random.PRNGKey(0), img)["params"]
  wrong = g.DuplicatedBlockGaussianHead(cfg.vision_width // 2, 2, cfg.embed_dim)
  hparams = jax.eval_shape(wrong.init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 3, cfg.vision_width // 2)))["params"]
  with pytest.raises(ValueError, match="mu_block vs tower last block"):
    g.duplicated_head_params_from_tower(hparams, tparams)
  with pytest.raises(ValueError, match="ln_post"):
    g.tower_parts({"transformer": {"resblocks_0": {}}, "ln_final": {}})


def test_tower_parts_picks_the_last_block_and_the_right_projection():
  cfg = CLIPConfig.tiny(text_layers=11)  # resblocks_10 must win over resblocks_9 (not lexical)
  tower = TextTransformer(cfg)
  ids = jnp.ones((1, cfg.context_length), jnp.int32)
  tparams = jax.eval_shape(tower.init, jax.random.PRNGKey(0), ids)["params"]
  last, ln, proj = g.tower_parts(tparams)
  assert last is tparams["transformer"]["resblocks_10"]
  assert ln is tparams["ln_final"] and proj is tparams["text_projection"]


# ----------------------------------------------------------------------------
# MLP head, names, dtype
# ----------------------------------------------------------------------------


def test_mlp_head_matches_numpy_and_starts_constant():
  d = 6
  mod = g.MLPGaussianHead(hidden_dim=10, log_sigma_init=-2.5)
  f = jnp.asarray(np.random.default_rng(8).standard_normal((3, 4, d)), jnp.float32)
  params = jax.jit(mod.init)(jax.random.PRNGKey(0), f)["params"]
  mu, ls = mod.apply({"params": params}, f)
  assert mu is f
  np.testing.assert_array_equal(np.asarray(ls), -2.5)
  params = _randomize(params, 9)
  _, ls = mod.apply({"params": params}, f)
  p = _np(params)
  h = np_dense(np.asarray(f), p["fc1"])
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))  # tanh GELU
  np.testing.assert_allclose(np.asarray(ls), np_dense(h, p["fc2"]), rtol=RTOL, atol=ATOL)


def test_mlp_head_stop_gradient_input():
  f = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
  for stop in (False, True):
    mod = g.MLPGaussianHead(stop_gradient_input=stop, out_kernel_std=0.1)
    params = jax.jit(mod.init)(jax.random.PRNGKey(1), f)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(mod.apply(params, x)[1])))(f)
    assert np.all(np.asarray(grad) == 0.0) == stop


def test_param_names_avoid_the_5x_lr_rules():
  x = jnp.zeros((1, 3, 16))
  trees = [jax.eval_shape(g.DuplicatedBlockGaussianHead(16, 2, 8).init, jax.random.PRNGKey(0), x),
           jax.eval_shape(g.MLPGaussianHead().init, jax.random.PRNGKey(0), jnp.zeros((1, 8)))]
  for tree in trees:
    for path, _ in jax.tree_util.tree_leaves_with_path(tree):
      name = jax.tree_util.keystr(path).lower()
      for bad in ("cross", "classifier", "mlm_head"):
        assert bad not in name, name


def test_bfloat16_compute_gives_float32_log_sigma_under_jit():
  head = g.DuplicatedBlockGaussianHead(16, 2, 8, dtype="bfloat16", out_kernel_std=0.02)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  params = jax.jit(head.init)(jax.random.PRNGKey(1), x)
  mu, ls = jax.jit(head.apply)(params, x)
  assert mu.dtype == jnp.bfloat16 and ls.dtype == jnp.float32
  ref_mu, ref_ls = jax.jit(g.DuplicatedBlockGaussianHead(16, 2, 8, out_kernel_std=0.02).apply)(
      params, x)
  np.testing.assert_allclose(np.asarray(mu, np.float32), np.asarray(ref_mu), atol=0.1)
  np.testing.assert_allclose(np.asarray(ls), np.asarray(ref_ls), atol=0.05)
