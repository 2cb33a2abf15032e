"""Methods: a model plus its per-example forward and its batch loss.

`build_method(config, num_classes)` picks the method named by `config.method` with plain imports.
"""
from __future__ import annotations

from tipr_jax.methods.base import Method, example_keys


def build_method(config, *, clip_config, num_classes: int,
                 steps_per_epoch: int | None = None) -> Method:
  """The `Method` for `config.method`.

  steps_per_epoch: training steps per epoch, for methods whose losses switch on at an epoch
  (parts: `config.parts.start_epoch`); the others ignore it.
  """
  name = config.method
  if name == "irra":
    from tipr_jax.methods import irra
    return irra.build(config, clip_config=clip_config, num_classes=num_classes)
  if name == "fmfa":
    from tipr_jax.methods import fmfa
    return fmfa.build(config, clip_config=clip_config, num_classes=num_classes)
  if name == "parts":
    from tipr_jax.methods import parts
    return parts.build(config, clip_config=clip_config, num_classes=num_classes,
                       steps_per_epoch=steps_per_epoch)
  if name == "ucfa":
    from tipr_jax.methods import ucfa
    return ucfa.build(config, clip_config=clip_config, num_classes=num_classes)
  if name == "mum":
    from tipr_jax.methods import mum
    return mum.build(config, clip_config=clip_config, num_classes=num_classes)
  raise ValueError(f"config.method: unknown method {name!r}; known: irra, fmfa, parts, ucfa, mum")


__all__ = ["Method", "build_method", "example_keys"]
