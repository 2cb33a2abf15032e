"""A trained model rebuilt from its training workdir, for encoding galleries and queries.

The workdir's resolved config (`config.json`, else `results.json["config"]`) gives the method, the
model and the tokenizer; the parameters come from the workdir's best (else latest) checkpoint, as
`checkpointing.load_params` resolves it. The classifier size is read from the checkpoint itself,
so the dataset the model was trained on need not be present.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from typing import Any, Sequence

import jax
import numpy as np
from ml_collections import config_dict

from tipr_jax.data.tokenizer import Tokenizer
from tipr_jax.eval import evaluate as evaluate_lib
from tipr_jax.methods import Method, build_method
from tipr_jax.training import checkpointing, data_setup, sharding
from tipr_jax.training.loop import clip_config_from

PyTree = Any
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_CONFIG_FILES = ("config.json", "results.json")


class QueryTruncatedWarning(UserWarning):
  """A query has more tokens than the model's context; it was cut."""


def find_workdir(checkpoint: str) -> str:
  """The training workdir of `checkpoint` (a workdir or a checkpoint directory inside one)."""
  path = os.path.abspath(checkpoint)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {checkpoint}: no such file or directory")
  probe = path
  for _ in range(4):  # workdir/best/<step>/params at most three levels down
    if any(os.path.isfile(os.path.join(probe, f)) for f in _CONFIG_FILES):
      return probe
    probe = os.path.dirname(probe)
  raise FileNotFoundError(f"checkpoint {checkpoint}: found no config.json or results.json in it or "
                          f"its parents; pass a training workdir (written by launch.py)")


def read_config(workdir: str) -> config_dict.ConfigDict:
  """The resolved training config saved in `workdir` (config.json, else results.json)."""
  for name in _CONFIG_FILES:
    path = os.path.join(workdir, name)
    if os.path.isfile(path):
      with open(path) as f:
        data = json.load(f)
      if name == "results.json":
        if "config" not in data:
          raise ValueError(f"{path} has no 'config' entry")
        data = data["config"]
      return config_dict.ConfigDict(data)
  raise FileNotFoundError(f"{workdir} holds neither config.json nor results.json")


def _existing(path: str) -> str | None:
  for cand in (path, os.path.join(_REPO_ROOT, path)) if not os.path.isabs(path) else (path,):
    if os.path.exists(cand):
      return cand
  return None


def tokenizer_path(config) -> str:
  """Where the training job took its tokenizer from (data_setup's rules), resolved to a path.

  Relative paths are tried against the working directory, then the repository root.
  """
  raw_root = None
  if config.data.dataset == "synthetic":
    raw_root = os.path.join(config.data.manual_dir, data_setup.synthetic_variant(config))
  path = data_setup._tokenizer_path(config, raw_root)  # pylint: disable=protected-access
  found = _existing(path)
  if found is None:
    raise FileNotFoundError(f"tokenizer {path} (from the training config) does not exist here; "
                            f"pass --tokenizer=PATH (a bpe_simple_vocab_16e6.txt.gz file, a Hugging "
                            f"Face CLIP directory or the dataset directory holding vocab.json)")
  return found


def _num_classes(item_dir: str) -> int:
  """The ID classifier's output size, read from the checkpoint's metadata (1 if it has none)."""
  shapes = checkpointing._metadata_shapes(item_dir)  # pylint: disable=protected-access
  for key in sorted(shapes, key=len):  # keys look like "['classifier']['bias']" or "classifier/bias"
    parts = re.findall(r"[^\[\]'\"/.]+", key)
    if parts[-2:] in (["classifier", "bias"], ["classifier", "kernel"]):
      return int(shapes[key][-1])
  return 1  # no ID classifier: the size does not matter (load_params still checks every shape)


def fingerprint(params: PyTree, config) -> str:
  """sha256 over the method, config.model and every parameter (path, dtype, shape, bytes)."""
  h = hashlib.sha256()
  model_cfg = config_dict.ConfigDict(config.model).to_dict() if config is not None else {}
  h.update(json.dumps({"method": config.method if config is not None else None,
                       "model": model_cfg}, sort_keys=True, default=str).encode())
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}".encode())
    h.update(arr.reshape(-1).view(np.uint8))  # raw bytes (also for bfloat16 and scalars)
  return h.hexdigest()


@dataclasses.dataclass
class Model:
  """A trained model ready to encode: jitted, batch-sharded, L2-normalized encoders."""
  workdir: str
  checkpoint: str        # the resolved checkpoint item directory
  config: config_dict.ConfigDict
  method: Method
  params: PyTree         # replicated over `mesh`
  tokenizer: Tokenizer
  image_size: tuple[int, int]
  fingerprint: str
  mesh: Any

  def __post_init__(self):
    self._enc_img = evaluate_lib.make_image_encoder(self.method.encode_image, self.mesh)
    self._enc_txt = evaluate_lib.make_encoder(self.method.encode_text, self.mesh)

  @property
  def context_length(self) -> int:
    return self.tokenizer.context_length

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    """Test-transformed images uint8 [B, H, W, 3] -> normalized features float32 [B, D].

    B must be a multiple of the device count.
    """
    batch = sharding.global_batch({"images": images}, self.mesh)
    return sharding.to_host(self._enc_img(self.params, batch["images"]))

  def tokenize(self, queries: Sequence[str]) -> np.ndarray:
    """Token ids int32 [Q, L]; ValueError on an empty query, a warning for each truncated one."""
    ids = []
    for i, text in enumerate(queries):
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f"query {i + 1} is empty: give a description such as "
                         f"'a woman in a red coat with a black bag'")
      tokens = self.tokenizer.encode(text)
      if not tokens:
        raise ValueError(f"query {i + 1} ({text!r}) has no words the tokenizer can read")
      if len(tokens) + 2 > self.context_length:
        kept = self.tokenizer.decode(tokens[:self.context_length - 2])
        warnings.warn(
            f"query {i + 1} has {len(tokens)} tokens but the model reads {self.context_length - 2} "
            f"(context {self.context_length} with start/end tokens): truncated to {kept!r}",
            QueryTruncatedWarning, stacklevel=2)
      ids.append(self.tokenizer([text])[0])
    return np.stack(ids).astype(np.int32)

  def encode_queries(self, queries: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Texts -> normalized features float32 [Q, D] (see `tokenize` for the checks)."""
    ids = self.tokenize(queries)
    n_dev = self.mesh.devices.size
    out = []
    for lo in range(0, len(ids), batch_size):
      block = ids[lo:lo + batch_size]
      width = max(n_dev, 1 << (len(block) - 1).bit_length())  # few distinct shapes to compile
      width = -(-width // n_dev) * n_dev
      padded = np.zeros((width, ids.shape[1]), np.int32)
      padded[:len(block)] = block
      glob = sharding.global_batch({"ids": padded}, self.mesh)
      out.append(sharding.to_host(self._enc_txt(self.params, glob["ids"]))[:len(block)])
    return np.concatenate(out)


def load_model(checkpoint: str, *, tokenizer: str | None = None, mesh=None) -> Model:
  """Rebuilds the model of a training workdir (or a checkpoint inside one) with its parameters."""
  workdir = find_workdir(checkpoint)
  item_dir = checkpointing.find_params_dir(checkpoint)
  if not item_dir.is_dir():
    raise FileNotFoundError(f"checkpoint {checkpoint}: no checkpoint found (expected "
                            f"best/<step>/params or checkpoints/<step>/state)")
  config = read_config(workdir)
  tok_path = tokenizer if tokenizer else tokenizer_path(config)
  tok = Tokenizer.from_pretrained(tok_path, context_length=config.model.clip.context_length)
  clip_cfg = clip_config_from(config, tok)
  # steps_per_epoch only schedules losses (never run here); any positive value builds the method.
  method = build_method(config, clip_config=clip_cfg, num_classes=_num_classes(item_dir),
                        steps_per_epoch=1)
  abstract = jax.eval_shape(method.init, jax.random.key(0))
  params = checkpointing.load_params(item_dir, abstract)
  fp = fingerprint(params, config)
  mesh = sharding.make_mesh() if mesh is None else mesh
  params = jax.device_put(params, sharding.replicated(mesh))
  return Model(workdir=workdir, checkpoint=os.fspath(item_dir), config=config, method=method, params=params,
               tokenizer=tok, image_size=tuple(clip_cfg.image_size), fingerprint=fp, mesh=mesh)
