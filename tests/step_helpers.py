"""Shared by the train-step tests: smoke configs, random batches and a sharded step runner.

The methods' parity tests (8 devices = 1 device, accumulation = one big batch) all train a tiny
model on random batches of a 64-token vocabulary; this module is that set-up, written once.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from ml_collections import config_dict

from tipr_jax.methods import build_method
from tipr_jax.models.clip import CLIPConfig
from tipr_jax.training import optimizer, sharding
from tipr_jax.training.train_step import create_train_state, jit_train_step, make_train_step

VOCAB = 64
NUM_CLASSES = 5


def smoke_config(get_config: Callable[[str], config_dict.ConfigDict], arg: str,
                 **overrides: Any) -> config_dict.ConfigDict:
  """`get_config(arg)` unlocked, with Adam eps 1e-3 and lr 1e-3, then dotted-key overrides.

  The reference's Adam eps (1e-3): with 1e-8, parameters whose true gradient is exactly zero (the
  key part of attention in-projection biases: softmax ignores a constant shift) get rounding-noise
  gradients (~1e-10) that Adam blows up to +-lr, in any summation order. lr 1e-3: a wrong update
  moves a parameter by ~1e-3, far above the 1e-5 parity tolerance.
  Overrides: `smoke_config(f, "synthetic,smoke", **{"train.batch_size": 16})`.
  """
  c = get_config(arg)
  c.unlock()
  c.optim.eps = 1e-3
  c.optim.lr = 1e-3
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for k in path:
      node = node[k]
    node[last] = value
  return c


def vocab_clip(c: config_dict.ConfigDict, vocab: int = VOCAB) -> CLIPConfig:
  """The config's CLIP shapes with a fixed vocabulary (no tokenizer file needed)."""
  d = dict(c.model.clip)
  d["vocab_size"] = vocab
  return CLIPConfig.from_dict(d)


def random_batch(clip: CLIPConfig, b: int, seed: int = 0, vocab: int = VOCAB,
                 num_classes: int = NUM_CLASSES) -> dict[str, np.ndarray]:
  """Random captions (SOT .. EOT, padding 0), MLM-masked copies (mask id vocab-3, at least one
  masked position per caption), N(0, 1) images [b,H,W,3] and pids in [0, num_classes)."""
  rng = np.random.default_rng(seed)
  h, w = clip.image_size
  ctx = clip.context_length
  ids = np.zeros((b, ctx), np.int32)
  for i in range(b):
    n = rng.integers(4, ctx - 2)
    ids[i, 0] = vocab - 2
    ids[i, 1:n] = rng.integers(1, vocab - 3, n - 1)
    ids[i, n] = vocab - 1
  labels = np.where((rng.random(ids.shape) < 0.3) & (ids > 0) & (ids < vocab - 3), ids, 0)
  labels[:, 1] = np.where(labels.sum(1) == 0, ids[:, 1], labels[:, 1])
  mlm_ids = np.where(labels > 0, vocab - 3, ids).astype(np.int32)
  return dict(images=rng.standard_normal((b, h, w, 3)).astype(np.float32),
              caption_ids=ids, mlm_ids=mlm_ids, mlm_labels=labels.astype(np.int32),
              pids=rng.integers(0, num_classes, b).astype(np.int32),
              image_ids=np.arange(b, dtype=np.int32))


def run_steps(c: config_dict.ConfigDict, devices: Sequence[jax.Device],
              batches: Sequence[dict], params: Any = None, steps_per_epoch: int = 2,
              num_classes: int = NUM_CLASSES) -> tuple[Any, Any, list[dict[str, float]]]:
  """Trains the config's method on `batches` over a data mesh of `devices`.

  params: initial parameters (host arrays) or None for `method.init(key 0)`. The optimizer
  schedule spans 2 epochs of `steps_per_epoch` steps. Returns (initial params, final params,
  per-step metrics as floats), parameters as host arrays.
  """
  mesh = sharding.make_mesh(devices)
  method = build_method(c, clip_config=vocab_clip(c), num_classes=num_classes,
                        steps_per_epoch=steps_per_epoch)
  if params is None:
    params = jax.jit(method.init, out_shardings=sharding.replicated(mesh))(jax.random.key(0))
  else:
    params = jax.device_put(params, sharding.replicated(mesh))
  initial = jax.device_get(params)
  tx, sched = optimizer.make_optimizer(params, c.optim, steps_per_epoch=steps_per_epoch,
                                       num_epochs=2)
  state = jax.jit(lambda p: create_train_state(p, tx, jax.random.key(1)),
                  out_shardings=sharding.replicated(mesh))(params)
  step = jit_train_step(make_train_step(method, tx, c, sched), sharding.replicated(mesh),
                        sharding.batch_sharded(mesh), sharding.replicated(mesh))
  metrics = []
  for b in batches:
    state, m = step(state, sharding.global_batch(b, mesh))
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  return initial, jax.device_get(state.params), metrics


def max_abs_diff(a: Any, b: Any) -> float:
  """Largest elementwise difference between two parameter trees."""
  diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))), a, b)
  return max(jax.tree_util.tree_leaves(diffs))
