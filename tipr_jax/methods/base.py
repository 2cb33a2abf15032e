"""The contract between a method and the training engine.

A method splits its objective in two pure functions so that the engine can run it on any number
of devices and micro-batches with identical results:

  forward(params, batch, rng) -> outputs   every leaf float32 with leading dim B (per example);
                                           randomness drawn per example (`example_keys`)
  loss(outputs, batch, step)  -> (scalar, metrics)   may couple examples (contrastive negatives)

With gradient accumulation the engine runs `forward` per micro-batch, `loss` once on the whole
batch, and back-propagates the loss gradient into each micro-batch (train_step.py), so the loss
sees the global batch exactly as without accumulation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Method:
  """A model and the functions the engine calls (all pure, all jit-able)."""
  name: str
  model: nn.Module
  init: Callable[[jax.Array], PyTree]                       # rng -> params
  forward: Callable[[PyTree, Batch, jax.Array], dict[str, jax.Array]]
  loss: Callable[[dict[str, jax.Array], Batch, jax.Array], tuple[jax.Array, dict]]
  encode_image: Callable[[PyTree, jax.Array], jax.Array]    # images [B,H,W,3] -> [B,D]
  encode_text: Callable[[PyTree, jax.Array], jax.Array]     # token ids [B,L] -> [B,D]
  clip_params_path: tuple[str, ...] = ("base_model",)       # where pretrained CLIP weights go
  # params -> params, run after the pretrained CLIP weights are grafted (e.g. copies a pretrained
  # block into a new head); None: nothing to do.
  after_pretrained: Callable[[PyTree], PyTree] | None = None


def example_keys(rng: jax.Array, batch: Batch) -> jax.Array:
  """One key per example, from its position in the global batch: [B] keys.

  Independent of how the batch is split into micro-batches or devices.
  """
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(batch["example_index"])


def per_example_token_ce(scores: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Cross-entropy summed per example over labelled tokens (label 0 = ignore).

  scores [B,N,V] float32, labels [B,N] -> {nll, count, correct}, each [B] float32.
  """
  logp = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  mask = (labels != 0).astype(jnp.float32)
  correct = (jnp.argmax(scores, axis=-1) == labels).astype(jnp.float32) * mask
  return dict(nll=-jnp.sum(picked * mask, axis=1), count=jnp.sum(mask, axis=1),
              correct=jnp.sum(correct, axis=1))
