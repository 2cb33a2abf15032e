"""Optimizer: IRRA's parameter groups, coupled-L2 Adam and the per-epoch warm-up + cosine schedule.

The reference (irra-reference.md §7) builds one torch param group per tensor with rules applied in
order, later rules overriding earlier ones:

  1. default: lr = base_lr, weight decay = wd
  2. name contains "cross"                       -> lr = base_lr * lr_factor
  3. name contains "bias"                        -> lr = base_lr * bias_lr_factor, wd = wd_bias
  4. name contains "classifier" or "mlm_head"    -> lr = base_lr * lr_factor (wd unchanged)

and steps `torch.optim.Adam` (coupled L2: grad += wd * param) with eps 1e-3. Here every parameter
gets a label "<lr multiplier>|<weight decay>" from the same rules applied to its '/'-joined path;
`optax.multi_transform` maps each label to `add_decayed_weights(wd) -> scale_by_adam ->
scale_by_learning_rate(multiplier * schedule)`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """The learning-rate multiplier and weight decay one parameter receives."""
  lr_mult: float
  weight_decay: float

  @property
  def label(self) -> str:
    return f"lr_x{self.lr_mult:g}|wd{self.weight_decay:g}"


def param_path_name(path: Sequence[Any]) -> str:
  """'/'-joined name of a pytree path, e.g. 'base_model/visual/ln_pre/bias'."""
  parts = []
  for key in path:
    name = getattr(key, "key", None)
    if name is None:
      name = getattr(key, "name", None)
    if name is None:
      name = getattr(key, "idx", key)
    parts.append(str(name))
  return "/".join(parts)


def group_for_name(name: str, *, lr_factor: float, bias_lr_factor: float, weight_decay: float,
                   weight_decay_bias: float, high_lr_keys: Sequence[str],
                   head_keys: Sequence[str]) -> ParamGroup:
  """Applies the reference's override rules (§7) to one parameter name."""
  lr_mult, wd = 1.0, weight_decay
  if any(k in name for k in high_lr_keys):
    lr_mult = lr_factor
  # Flax names every bias 'bias' (LayerNorm shift included), as torch does.
  if "bias" in name:
    lr_mult, wd = bias_lr_factor, weight_decay_bias
  if any(k in name for k in head_keys):
    lr_mult = lr_factor
  return ParamGroup(lr_mult, wd)


def param_groups(params: PyTree, optim_config) -> PyTree:
  """A pytree of `ParamGroup`s with the structure of `params`."""
  def assign(path, _):
    return group_for_name(
        param_path_name(path), lr_factor=optim_config.lr_factor,
        bias_lr_factor=optim_config.bias_lr_factor, weight_decay=optim_config.weight_decay,
        weight_decay_bias=optim_config.weight_decay_bias,
        high_lr_keys=tuple(optim_config.high_lr_keys), head_keys=tuple(optim_config.head_keys))
  return jax.tree_util.tree_map_with_path(assign, params)


def warmup_cosine_factor(epoch: jnp.ndarray, *, num_epochs: int, warmup_epochs: int,
                         warmup_factor: float, target_factor: float = 0.0) -> jnp.ndarray:
  """The reference's lr factor for a (1-based, possibly fractional) epoch.

  epoch < warmup + 1: warmup_factor * (1 - a) + a with a = (epoch - 1) / warmup_epochs (linear);
  after: target + (1 - target) * 0.5 * (1 + cos(pi * (epoch - warmup - 1) / (num_epochs - warmup))).
  For whole epochs this is the reference's rule (warm-up for e <= warmup); for fractional epochs
  (per-step schedule) both pieces meet at epoch = warmup + 1 with factor 1.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  if warmup_epochs > 0:
    alpha = (epoch - 1.0) / warmup_epochs
    warm = warmup_factor * (1.0 - alpha) + alpha
  else:
    warm = jnp.ones_like(epoch)
  span = max(num_epochs - warmup_epochs, 1)
  progress = (epoch - warmup_epochs - 1.0) / span
  cos = target_factor + (1.0 - target_factor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
  return jnp.where(epoch < warmup_epochs + 1, warm, cos)


def make_schedule(optim_config, *, steps_per_epoch: int, num_epochs: int) -> Callable[[Any], Any]:
  """Step -> learning-rate factor (multiplied by the base lr and each group's multiplier).

  `optim_config.schedule_unit == 'epoch'` follows the reference: the factor is constant within an
  epoch and changes once per epoch. 'step' interpolates the same curve per step.
  """
  unit = optim_config.schedule_unit
  if unit not in ("epoch", "step"):
    raise ValueError(f"config.optim.schedule_unit must be 'epoch' or 'step', got {unit!r}")
  if optim_config.schedule != "cosine":
    raise ValueError(f"config.optim.schedule: only 'cosine' (with linear warm-up) is implemented, "
                     f"got {optim_config.schedule!r}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if unit == "epoch":
      epoch = jnp.floor(step / steps_per_epoch) + 1.0
    else:
      epoch = step / steps_per_epoch + 1.0
    return optim_config.lr * warmup_cosine_factor(
        epoch, num_epochs=num_epochs, warmup_epochs=optim_config.warmup_epochs,
        warmup_factor=optim_config.warmup_factor, target_factor=optim_config.target_factor)
  return schedule


def make_optimizer(params: PyTree, optim_config, *, steps_per_epoch: int,
                   num_epochs: int) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """The reference's optimizer as an optax chain, and its base-lr schedule (for logging)."""
  schedule = make_schedule(optim_config, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)
  groups = param_groups(params, optim_config)
  distinct = {g.label: g for g in jax.tree_util.tree_leaves(groups)}

  def group_tx(group: ParamGroup) -> optax.GradientTransformation:
    parts = []
    if group.weight_decay:
      parts.append(optax.add_decayed_weights(group.weight_decay))  # coupled L2, as torch Adam
    if optim_config.name == "adam":
      parts.append(optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2,
                                       eps=optim_config.eps, eps_root=0.0))
    else:
      raise ValueError(f"config.optim.name: only 'adam' is implemented, got {optim_config.name!r}")
    parts.append(optax.scale_by_learning_rate(lambda s, m=group.lr_mult: m * schedule(s)))
    return optax.chain(*parts)

  labels = jax.tree_util.tree_map(lambda g: g.label, groups)
  tx = optax.multi_transform({label: group_tx(g) for label, g in distinct.items()}, labels)
  if optim_config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), tx)
  return tx, schedule
