"""The jitted train step: 8 devices equal 1 device; accumulation equals one big batch."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from configs import presets
from configs import synthetic as synthetic_config
from tipr_jax.methods import build_method
from tipr_jax.models.clip import CLIPConfig
from tipr_jax.training import optimizer, sharding
from tipr_jax.training.train_step import create_train_state, jit_train_step, make_train_step

VOCAB = 64
NUM_CLASSES = 5


def _config(**train):
  c = synthetic_config.get_config("smoke")
  c.unlock()
  # The reference's Adam eps (1e-3). With eps 1e-8, parameters whose true gradient is exactly zero
  # (the key part of attention in-projection biases: softmax ignores a constant shift) get
  # rounding-noise gradients (~1e-10) that Adam blows up to +-lr, in any summation order.
  c.optim.eps = 1e-3
  c.optim.lr = 1e-3
  for k, v in train.items():
    setattr(c.train, k, v)
  return c


def _clip(c):
  d = dict(c.model.clip)
  d["vocab_size"] = VOCAB
  return CLIPConfig.from_dict(d)


def _batch(clip: CLIPConfig, b: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  h, w = clip.image_size
  ctx = clip.context_length
  ids = np.zeros((b, ctx), np.int32)
  for i in range(b):
    n = rng.integers(4, ctx - 2)
    ids[i, 0] = VOCAB - 2
    ids[i, 1:n] = rng.integers(1, VOCAB - 3, n - 1)
    ids[i, n] = VOCAB - 1
  labels = np.where((rng.random(ids.shape) < 0.3) & (ids > 0) & (ids < VOCAB - 3), ids, 0)
  labels[:, 1] = np.where(labels.sum(1) == 0, ids[:, 1], labels[:, 1])
  mlm_ids = np.where(labels > 0, VOCAB - 3, ids).astype(np.int32)
  return dict(images=rng.standard_normal((b, h, w, 3)).astype(np.float32),
              caption_ids=ids, mlm_ids=mlm_ids, mlm_labels=labels.astype(np.int32),
              pids=rng.integers(0, NUM_CLASSES, b).astype(np.int32),
              image_ids=np.arange(b, dtype=np.int32))


def _run(c, devices, batches):
  mesh = sharding.make_mesh(devices)
  clip = _clip(c)
  method = build_method(c, clip_config=clip, num_classes=NUM_CLASSES)
  params = jax.jit(method.init, out_shardings=sharding.replicated(mesh))(jax.random.key(0))
  tx, sched = optimizer.make_optimizer(params, c.optim, steps_per_epoch=2, num_epochs=2)
  state = jax.jit(lambda p: create_train_state(p, tx, jax.random.key(1)),
                  out_shardings=sharding.replicated(mesh))(params)
  step = jit_train_step(make_train_step(method, tx, c, sched), sharding.replicated(mesh),
                        sharding.batch_sharded(mesh), sharding.replicated(mesh))
  losses = []
  for b in batches:
    state, m = step(state, sharding.global_batch(b, mesh))
    losses.append(float(m["loss"]))
  return jax.device_get(state.params), losses


def _max_abs_diff(a, b):
  """Largest parameter difference. Parameters are O(1e-3..1) and each step moves them by up to
  lr = 1e-3, so 1e-5 catches any wrong update while allowing float32 summation-order noise."""
  diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
  return max(jax.tree_util.tree_leaves(diffs))


def test_eight_devices_equal_one_device():
  c = _config()
  clip = _clip(c)
  batches = [_batch(clip, 8, s) for s in range(2)]
  p1, l1 = _run(c, jax.devices()[:1], batches)
  p8, l8 = _run(c, jax.devices()[:8], batches)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  assert _max_abs_diff(p8, p1) < 1e-5


def test_gradient_accumulation_equals_full_batch():
  clip = _clip(_config())
  batches = [_batch(clip, 8, s) for s in range(2)]
  p1, l1 = _run(_config(grad_accum_steps=1), jax.devices()[:2], batches)
  p4, l4 = _run(_config(grad_accum_steps=4), jax.devices()[:2], batches)
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  assert _max_abs_diff(p4, p1) < 1e-5


def test_training_lowers_the_loss_on_a_fixed_batch():
  c = _config()
  clip = _clip(c)
  batch = _batch(clip, 8, 0)
  _, losses = _run(c, jax.devices()[:1], [batch] * 6)
  assert losses[-1] < losses[0]


def test_mlm_cap_gives_the_full_projection_result():
  """Gathering masked positions (cap) equals running the head on every position."""
  from tipr_jax.methods import irra
  from tipr_jax.models.irra import IRRA
  c = _config()
  clip = _clip(c)
  model = IRRA(clip, num_classes=NUM_CLASSES, cmt_depth=1)
  b = _batch(clip, 4)
  params = model.init(jax.random.key(0), jnp.asarray(b["images"]), jnp.asarray(b["caption_ids"]))
  params = params["params"]
  x = jax.random.normal(jax.random.key(2), (4, clip.context_length, clip.embed_dim))
  labels = jnp.asarray(b["mlm_labels"])
  full = irra.mlm_token_losses(model, params, x, labels, cap=0)
  capped = irra.mlm_token_losses(model, params, x, labels, cap=int(labels.astype(bool).sum(1).max()))
  overflow = irra.mlm_token_losses(model, params, x, labels, cap=1)  # falls back to full
  for k in full:
    np.testing.assert_allclose(capped[k], full[k], rtol=1e-6)
    np.testing.assert_allclose(overflow[k], full[k], rtol=1e-6)
  assert float(full["count"].sum()) == float((b["mlm_labels"] > 0).sum())
