"""One jitted training step: forward, loss over the global batch, optimizer update.

`make_train_step(method, tx, config)` returns `step(state, batch) -> (state, metrics)`, a pure
function; the caller jits it with donated state and batch-sharded inputs (`jit_train_step`).
The batch's images arrive as the pipeline's uint8 pixels and erase boxes and are normalized
inside the step (`device_images.prepare_batch`); float images are taken as already normalized.

Gradient accumulation keeps the loss exact: with k micro-batches the step runs `forward` on each
micro-batch without gradients, evaluates `loss` ONCE on the concatenated outputs (so contrastive
negatives are the whole global batch, as on the reference's single GPU), takes the gradient of the
loss with respect to those outputs, and back-propagates it through each micro-batch's forward
(a second forward per micro-batch, then its VJP), summing parameter gradients. The result equals
the k = 1 gradient up to float rounding, at the cost of one extra forward pass.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from tipr_jax.data import device_images
from tipr_jax.methods.base import Method

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array


def create_train_state(params: PyTree, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng)


def _split_micro(tree: PyTree, k: int) -> PyTree:
  """[B, ...] -> [k, B/k, ...], micro-batch j = rows j, j+k, j+2k, ... (spread over devices)."""
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(split, tree)


def _merge_micro(tree: PyTree) -> PyTree:
  """Inverse of `_split_micro`: [k, B/k, ...] -> [B, ...]."""
  def merge(x):
    k, bk = x.shape[:2]
    return jnp.swapaxes(x, 0, 1).reshape((k * bk,) + x.shape[2:])
  return jax.tree_util.tree_map(merge, tree)


def loss_and_grads(method: Method, params: PyTree, batch: dict, rng: jax.Array, step: jax.Array,
                   accum_steps: int) -> tuple[jax.Array, dict, PyTree]:
  """(loss, metrics, grads) of `method` on `batch`, with `accum_steps` micro-batches."""
  if accum_steps == 1:
    def objective(p):
      return method.loss(method.forward(p, batch, rng), batch, step)
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return loss, metrics, grads

  micro = _split_micro(batch, accum_steps)
  outputs = _merge_micro(jax.lax.map(lambda mb: method.forward(params, mb, rng), micro))
  (loss, metrics), out_grads = jax.value_and_grad(
      lambda o: method.loss(o, batch, step), has_aux=True)(outputs)
  micro_out_grads = _split_micro(out_grads, accum_steps)

  def accumulate(acc, xs):
    mb, g = xs
    _, vjp = jax.vjp(lambda p: method.forward(p, mb, rng), params)
    (grad,) = vjp(g)
    return jax.tree_util.tree_map(jnp.add, acc, grad), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  grads, _ = jax.lax.scan(accumulate, zeros, (micro, micro_out_grads))
  return loss, metrics, grads


def make_train_step(method: Method, tx: optax.GradientTransformation, config,
                    schedule: Callable[[jax.Array], jax.Array] | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The pure train step for `method`. A non-finite loss leaves params and optimizer unchanged
  and reports `finite = 0` so the loop can stop with the last good checkpoint intact."""
  accum = int(config.train.grad_accum_steps)
  if accum < 1:
    raise ValueError(f"config.train.grad_accum_steps must be >= 1, got {accum}")

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if batch_size % accum:
      raise ValueError(f"batch size {batch_size} is not divisible by "
                       f"config.train.grad_accum_steps={accum}")
    batch = device_images.prepare_batch(batch)  # uint8 pixels -> normalized, erased float32
    batch = dict(batch, example_index=jnp.arange(batch_size, dtype=jnp.int32))
    rng, step_rng = jax.random.split(state.rng)
    loss, metrics, grads = loss_and_grads(method, state.params, batch, step_rng, state.step, accum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state), rng=rng)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return new_state, metrics

  return step


def jit_train_step(step_fn: Callable, state_sharding: PyTree, batch_sharding: Any,
                   replicated: Any) -> Callable:
  """jit with donated state: state replicated, batch sharded over the data axis."""
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))
