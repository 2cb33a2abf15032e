"""The jitted train step: 8 devices equal 1 device; accumulation equals one big batch."""
import numpy as np
import jax
import jax.numpy as jnp

import step_helpers
from configs import synthetic as synthetic_config


def _config(**train):
  return step_helpers.smoke_config(synthetic_config.get_config, "smoke",
                                   **{f"train.{k}": v for k, v in train.items()})


_clip = step_helpers.vocab_clip
_batch = step_helpers.random_batch


def _run(c, devices, batches):
  """(final params, losses) of training on `batches` (2 steps per epoch in the schedule)."""
  _, params, metrics = step_helpers.run_steps(c, devices, batches)
  return params, [m["loss"] for m in metrics]


# Parameters are O(1e-3..1) and each step moves them by up to lr = 1e-3, so a 1e-5 bound on the
# largest difference catches any wrong update while allowing float32 summation-order noise.
_max_abs_diff = step_helpers.max_abs_diff


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
  model = IRRA(clip, num_classes=step_helpers.NUM_CLASSES, cmt_depth=1)
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


def test_uint8_pixels_and_erase_boxes_train_like_host_normalized_images():
  """The pipeline's uint8 + erase-box batch, normalized inside the step, trains exactly like
  float images normalized and erased on the host in float64 (the reference's order)."""
  c = _config()
  clip = _clip(c)
  mean = np.array([0.48145466, 0.4578275, 0.40821073])
  std = np.array([0.26862954, 0.26130258, 0.27577711])
  raw, host = [], []
  for s in range(2):
    b = _batch(clip, 8, s)
    rng = np.random.default_rng(10 + s)
    pixels = rng.integers(0, 256, b["images"].shape, dtype=np.uint8)
    h, w = clip.image_size
    boxes = np.stack([[rng.integers(0, h // 2), rng.integers(0, w // 2), rng.integers(0, h // 2),
                       rng.integers(0, w // 2)] for _ in range(8)]).astype(np.int32)
    boxes[::3] = 0  # some images not erased
    floats = (pixels / 255.0 - mean) / std
    for img, (t, l, bh, bw) in zip(floats, boxes):
      img[t:t + bh, l:l + bw] = mean
    raw.append(dict(b, images=pixels, erase_boxes=boxes))
    host.append(dict(b, images=floats.astype(np.float32)))
  p_raw, l_raw = _run(c, jax.devices()[:2], raw)
  p_host, l_host = _run(c, jax.devices()[:2], host)
  np.testing.assert_allclose(l_raw, l_host, rtol=1e-5)
  assert _max_abs_diff(p_raw, p_host) < 1e-5
