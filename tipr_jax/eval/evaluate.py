"""Encode a gallery and its queries with a jitted, sharded function, then score retrieval.

Every process encodes its own rows of each evaluation batch; rows are gathered in global order
and the padding rows (`valid == False`) dropped, so each image and caption counts exactly once.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tipr_jax.data import device_images
from tipr_jax.training import batch_log, sharding

PyTree = Any


def make_encoder(encode_fn: Callable[[PyTree, jax.Array], jax.Array], mesh: Mesh
                 ) -> Callable[[PyTree, jax.Array], jax.Array]:
  """jit(encode_fn) returning L2-normalized float32 features, batch-sharded."""
  def encode(params, x):
    f = encode_fn(params, x).astype(jnp.float32)
    return f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  return jax.jit(encode, out_shardings=sharding.batch_sharded(mesh))


def make_image_encoder(encode_image: Callable[[PyTree, jax.Array], jax.Array], mesh: Mesh
                       ) -> Callable[[PyTree, jax.Array], jax.Array]:
  """`make_encoder` for images: uint8 pixels [B,H,W,3] are normalized on the device first."""
  return make_encoder(lambda params, x: encode_image(params, device_images.model_images(x)), mesh)


def encode_all(encoder: Callable, params: PyTree, batches: Iterable[dict], key: str,
               mesh: Mesh) -> tuple[np.ndarray, float]:
  """Runs `encoder` on `batch[key]` of every batch; returns (features [N,D], seconds).

  Only rows whose `valid` flag is set are kept, in global batch order.
  """
  feats, start = [], time.perf_counter()
  for batch in batches:
    batch_log.record_eval(key, batch)  # no-op unless TIPR_DEBUG_BATCH_LOG is set
    glob = sharding.global_batch({key: batch[key], "valid": batch["valid"]}, mesh)
    f = sharding.to_host(encoder(params, glob[key]))
    valid = sharding.to_host(glob["valid"]).astype(bool)
    feats.append(f[valid])
  out = np.concatenate(feats, axis=0) if feats else np.zeros((0, 0), np.float32)
  return out, time.perf_counter() - start
