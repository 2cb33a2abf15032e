"""The float half of the image transforms, run on the accelerator inside the jitted steps.

The input pipeline ships uint8 pixels (4x fewer bytes than float32 through worker shared memory
and host-to-device transfers) plus, for training, each image's random-erasing box; this module
turns them into what the model takes, exactly as the reference's ToTensor -> Normalize ->
RandomErasing(value=mean) does:

  images float32 = (uint8 / 255 - CLIP_MEAN) / CLIP_STD, then the box [top, top+h) x
  [left, left+w) of each image set to CLIP_MEAN (the reference fills the *normalized* image with
  the mean values); a box with h = 0 or w = 0 erases nothing.

Float images are taken as already normalized and pass through unchanged, so callers that build
model inputs themselves (tests, benchmarks, pretrained-parity checks) keep working.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tipr_jax.data.transforms import CLIP_MEAN, CLIP_STD

# x * _SCALE + _OFFSET = (x / 255 - mean) / std, the constants rounded once from float64.
_SCALE = (1.0 / (255.0 * CLIP_STD.astype(np.float64))).astype(np.float32)
_OFFSET = (-CLIP_MEAN.astype(np.float64) / CLIP_STD.astype(np.float64)).astype(np.float32)


def normalize(images: jax.Array) -> jax.Array:
  """uint8 [..., H, W, 3] -> float32 (x / 255 - mean) / std, per channel."""
  return images.astype(jnp.float32) * _SCALE + _OFFSET


def erase(images: jax.Array, boxes: jax.Array, value=CLIP_MEAN) -> jax.Array:
  """images float [B, H, W, C]; boxes int [B, 4] = (top, left, h, w): the box set to `value`."""
  h, w = images.shape[1:3]
  top, left, bh, bw = (boxes[:, i, None] for i in range(4))
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  in_rows = (rows >= top) & (rows < top + bh)          # [B, H]
  in_cols = (cols >= left) & (cols < left + bw)        # [B, W]
  inside = in_rows[:, :, None, None] & in_cols[:, None, :, None]
  return jnp.where(inside, jnp.asarray(value, images.dtype), images)


def model_images(images: jax.Array, erase_boxes: jax.Array | None = None) -> jax.Array:
  """What the image tower takes: uint8 pixels normalized (and erased), float images unchanged."""
  if images.dtype != jnp.uint8:
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(f"images must be uint8 pixels or normalized floats, got {images.dtype}")
    return images
  out = normalize(images)
  return out if erase_boxes is None else erase(out, erase_boxes)


def prepare_batch(batch: dict) -> dict:
  """A training batch with `images` turned into model input (uses and drops `erase_boxes`)."""
  batch = dict(batch)
  boxes = batch.pop("erase_boxes", None)
  batch["images"] = model_images(batch["images"], boxes)
  return batch
