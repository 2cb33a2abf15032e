"""Orbax checkpoints: the one place the project talks to Orbax.

A training checkpoint holds the train state (params, optimizer state, step, RNG) and the Grain
iterator state, so a rerun of the same command resumes exactly, input position included. Orbax
writes each step to a temporary directory and renames it when complete, so a run killed mid-save
(even by SIGKILL) leaves the previous checkpoint as the latest complete one.

The workdir may be a local directory or a bucket (gs://...): every path goes through
`etils.epath` (tipr_jax/training/paths.py), as Orbax's own do.

Directory layout inside a workdir:
  checkpoints/<step>/{state,data}   rolling training checkpoints (the last `keep`)
  best/<step>/{params,metrics}      the best model by the selection metric (one kept)
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tipr_jax.training import paths

PyTree = Any


def _manager(directory: epath.Path, *, keep: int, save_every_steps: int = 1,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=save_every_steps, create=not read_only,
      enable_async_checkpointing=False, read_only=read_only)
  return ocp.CheckpointManager(directory, options=options)


class TrainCheckpointer:
  """Saves and restores (train state, data iterator) in `workdir/checkpoints`."""

  def __init__(self, workdir: str | os.PathLike, *, save_every_steps: int, keep: int):
    self.directory = paths.resolve(workdir) / "checkpoints"
    self._manager = _manager(self.directory, keep=keep, save_every_steps=save_every_steps)

  def latest_step(self) -> int | None:
    """The newest COMPLETE checkpoint step. Step directories left incomplete by a killed save
    (no `_CHECKPOINT_METADATA`, or an item without its metadata) are removed on process 0, so the
    run resumes from the previous one and can write that step again."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    removed = False
    for step in steps:
      step_dir = self.directory / str(step)
      if _is_complete(step_dir):
        if removed:
          self._manager.reload()
        return step
      if jax.process_index() == 0:
        print(f"checkpoint {step_dir} is incomplete (interrupted save): removing it", flush=True)
        try:
          step_dir.rmtree()
        except FileNotFoundError:  # another process removed it first
          pass
      removed = True
    if removed:
      self._manager.reload()
    return None

  def save(self, step: int, state: PyTree, data_iterator=None, *, force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`). Returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    self._manager.wait_until_finished()
    return saved

  def restore(self, abstract_state: PyTree, data_iterator=None, step: int | None = None) -> PyTree:
    """Restores the state at `step` (default latest) into the shapes/shardings of `abstract_state`.

    The data iterator, if given, is restored in place.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    check_fits(self.directory / str(step) / "state", abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def close(self):
    self._manager.close()


def _is_complete(step_dir: epath.Path) -> bool:
  """A step directory whose save finished: top-level and every item's metadata present."""
  if not (step_dir / "_CHECKPOINT_METADATA").exists():
    return False
  return (step_dir / "state" / "_METADATA").exists() and ocp.step.is_checkpoint_finalized(
      step_dir)


class BestCheckpointer:
  """Keeps the parameters of the best evaluation so far in `workdir/best`."""

  def __init__(self, workdir: str | os.PathLike):
    self.directory = paths.resolve(workdir) / "best"
    self._manager = _manager(self.directory, keep=1)

  def save(self, step: int, params: PyTree, metrics: dict) -> None:
    metrics = {k: (float(v) if isinstance(v, (int, float, np.floating)) else v)
               for k, v in metrics.items()}
    self._manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), metrics=ocp.args.JsonSave(metrics)), force=True)
    self._manager.wait_until_finished()

  def best(self) -> tuple[int, dict] | None:
    step = self._manager.latest_step()
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))
    return step, dict(restored["metrics"])

  def close(self):
    self._manager.close()


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey (dataclasses, namedtuples), SequenceKey
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _tree_shapes(tree: PyTree) -> dict[str, tuple]:
  """'a/b/0/c' -> shape of every leaf. Plain names, so that a TrainState (attributes) and the
  checkpoint's metadata tree (nested dicts) of the same state give the same keys."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): _stored_shape(leaf) for path, leaf in flat}


def _stored_shape(leaf) -> tuple:
  """The leaf's shape as stored: a typed PRNG key array is saved as its raw key data."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
  return tuple(getattr(leaf, "shape", ()))


class _ItemDirNoise(logging.Filter):
  """Drops Orbax's warnings about step-level metadata when a single item directory is read.

  A CheckpointManager step keeps `_CHECKPOINT_METADATA` in `<step>/`, beside its items; reading
  one item (`best/<step>/params`) with a StandardCheckpointer looks for it inside the item and
  warns twice, although the item's own tree metadata is there and is what gets read.
  """
  _BENIGN = ("Metadata file does not exist", "Failed to get item metadata from directory")

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._BENIGN)


@contextlib.contextmanager
def _item_checkpointer() -> Iterator[ocp.StandardCheckpointer]:
  """A StandardCheckpointer for reading one item directory, without the benign warnings."""
  logger, noise = logging.getLogger("absl"), _ItemDirNoise()
  logger.addFilter(noise)
  try:
    yield ocp.StandardCheckpointer()
  finally:
    logger.removeFilter(noise)


def _metadata_shapes(item_dir: epath.Path) -> dict[str, tuple]:
  with _item_checkpointer() as ckpt:
    meta = ckpt.metadata(item_dir)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return _tree_shapes(tree)


def check_fits(item_dir: epath.Path, abstract: PyTree) -> None:
  """Raises ValueError naming every parameter whose presence or shape differs from `abstract`."""
  saved = _metadata_shapes(item_dir)
  wanted = _tree_shapes(abstract)
  problems = []
  for key, shape in wanted.items():
    if key not in saved:
      problems.append(f"{key}: expected by the model with shape {shape}, missing in the checkpoint")
    elif tuple(saved[key]) != tuple(shape):
      problems.append(f"{key}: checkpoint has shape {tuple(saved[key])}, model expects {shape}")
  for key in saved:
    if key not in wanted:
      problems.append(f"{key}: in the checkpoint (shape {tuple(saved[key])}) but not in the model")
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError(f"checkpoint {item_dir} does not fit the configured model "
                     f"({len(problems)} problems):\n  {shown}{more}")


def find_params_dir(path: str | os.PathLike) -> epath.Path:
  """Resolves `init_from`: a workdir (its best, else latest, checkpoint) or a checkpoint item dir."""
  path = paths.resolve(path)
  if not path.exists():
    raise FileNotFoundError(f"init_from: {path} does not exist")
  for sub, item in (("best", "params"), ("checkpoints", "state")):
    root = path / sub
    if root.is_dir():
      steps = sorted(int(d.name) for d in root.iterdir() if d.name.isdigit())
      if steps:
        return root / str(steps[-1]) / item
  for item in ("params", "state"):
    if (path / item).is_dir():
      return path / item
  return path


def load_params(path: str | os.PathLike, abstract_params: PyTree) -> PyTree:
  """Loads model parameters from a workdir or checkpoint, for evaluation or fine-tuning.

  Raises ValueError naming each parameter whose shape does not fit `abstract_params`.
  """
  item_dir = find_params_dir(path)
  if item_dir.name == "state":  # a full train state: take its params subtree
    with _item_checkpointer() as ckpt:
      meta = ckpt.metadata(item_dir)
      meta = getattr(meta, "item_metadata", meta)
      meta = getattr(meta, "tree", meta)
      restored = ckpt.restore(item_dir, _host_local_target(meta))
    if not isinstance(restored, dict) or "params" not in restored:
      raise ValueError(f"checkpoint {item_dir} holds no 'params' entry")
    params = restored["params"]
    saved, wanted = _tree_shapes(params), _tree_shapes(abstract_params)
    problems = [f"{k}: checkpoint has shape {saved.get(k)}, model expects {v}"
                for k, v in wanted.items() if saved.get(k) != v]
    problems += [f"{k}: in the checkpoint but not in the model" for k in saved if k not in wanted]
    if problems:
      raise ValueError(f"checkpoint {item_dir} does not fit the configured model:\n  "
                       + "\n  ".join(problems[:20]))
    return jax.tree_util.tree_map(np.asarray, params)
  check_fits(item_dir, abstract_params)
  with _item_checkpointer() as ckpt:
    params = ckpt.restore(item_dir, _host_local_target(abstract_params))
  return jax.tree_util.tree_map(np.asarray, params)


def _host_local_target(tree: PyTree) -> PyTree:
  """Shapes/dtypes of `tree` placed whole on this process's first device.

  A checkpoint records the devices that wrote it (e.g. 8 devices of 2 hosts); restoring with that
  sharding fails on any other topology, so every process reads full arrays onto a local device.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                tree)
