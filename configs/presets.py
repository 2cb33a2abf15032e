"""Presets shared by the dataset configs, selected with `configs/<file>.py:<preset>`."""
from __future__ import annotations

from ml_collections import config_dict


def small_clip(image_size=(96, 32), vocab_size=0) -> config_dict.ConfigDict:
  """A from-scratch CLIP small enough to train on a 2-core CPU in minutes."""
  return config_dict.ConfigDict(dict(
      embed_dim=128, image_size=tuple(image_size), patch_size=8, stride_size=8,
      vision_width=128, vision_layers=4, vision_heads=4, context_length=48,
      vocab_size=vocab_size, text_width=128, text_layers=3, text_heads=4, dtype="float32"))


def tiny_clip(image_size=(32, 16), vocab_size=0) -> config_dict.ConfigDict:
  """A few-thousand-parameter CLIP for tests."""
  return config_dict.ConfigDict(dict(
      embed_dim=32, image_size=tuple(image_size), patch_size=8, stride_size=8,
      vision_width=32, vision_layers=1, vision_heads=2, context_length=32,
      vocab_size=vocab_size, text_width=32, text_layers=1, text_heads=2, dtype="float32"))


def smoke(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """A few steps of a tiny model: what tests run. The dataset keeps its real reader and layout."""
  c.model.clip = tiny_clip()
  c.model.cmt_depth = 1
  c.data.augment = True
  c.data.num_workers = 0
  c.data.eval_batch_size = 16
  c.data.synthetic.identities = 24
  c.data.synthetic.images_per_identity = 2
  c.data.synthetic.image_size = (64, 32)
  c.train.batch_size = 8
  c.train.num_epochs = 2
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 2
  c.optim.warmup_epochs = 1
  c.optim.lr = 1e-4
  return c


def apply(c: config_dict.ConfigDict, arg: str | None) -> config_dict.ConfigDict:
  """Applies the comma-separated presets named in `arg` (e.g. 'smoke')."""
  for name in filter(None, (arg or "").split(",")):
    if name == "smoke":
      c = smoke(c)
    else:
      raise ValueError(f"unknown config preset {name!r}; known: smoke")
  return c
