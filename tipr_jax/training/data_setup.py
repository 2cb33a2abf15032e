"""Finds (or creates) the prepared dataset and the tokenizer a config asks for."""
from __future__ import annotations

import dataclasses
import os
import pathlib

import jax

from tipr_jax.data import builders
from tipr_jax.data import prepare as prepare_lib
from tipr_jax.data.tokenizer import Tokenizer
from tipr_jax.training import paths
from tipr_jax.training.reporting import log


@dataclasses.dataclass(frozen=True)
class DataSetup:
  dataset: str           # TFDS builder name
  data_dir: str          # directory holding <dataset>/<version>
  tokenizer: Tokenizer
  source_root: str | None  # raw layout root (synthetic: where attribute files live)


def synthetic_variant(config) -> str:
  s = config.data.synthetic
  h, w = s.image_size
  return f"synthetic-{s.identities}ids-{s.images_per_identity}img-seed{s.seed}-{h}x{w}"


def _ensure_synthetic(config) -> tuple[str, str]:
  """Generates the synthetic CUHK-layout data and prepares it, once. -> (data_dir, raw root)."""
  from tipr_jax.data import synthetic
  variant = synthetic_variant(config)
  raw_root = os.path.join(config.data.manual_dir, variant)
  data_dir = os.path.join(config.data.data_dir, variant)
  s = config.data.synthetic
  if jax.process_index() == 0:
    if not os.path.exists(os.path.join(raw_root, "CUHK-PEDES", "reid_raw.json")):
      log(f"generating the synthetic dataset in {raw_root} (first use)")
      synthetic.generate(raw_root, identities=s.identities, seed=s.seed, layout="cuhk",
                         images_per_identity=s.images_per_identity,
                         image_size=tuple(s.image_size))
    if not prepare_lib.output_dir("synthetic", data_dir).exists():
      log(f"preparing ArrayRecord files in {data_dir} (first use)")
      prepare_lib.prepare("synthetic", data_dir=data_dir, manual_dir=raw_root)
  _sync("synthetic data ready")
  return data_dir, raw_root


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _ensure_real(config) -> str:
  """A real dataset: prepared under data_dir, else prepared from manual_dir (clear error if absent)."""
  name, data_dir = config.data.dataset, config.data.data_dir
  if name not in builders.BUILDERS:
    raise ValueError(f"config.data.dataset: unknown dataset {name!r}; "
                     f"expected one of {sorted(builders.BUILDERS)}")
  if paths.resolve(data_dir).joinpath(name, builders.DATASET_VERSION).exists():  # local or gs://
    return data_dir
  layout_dir = pathlib.Path(config.data.manual_dir)
  if not layout_dir.is_dir():
    raise FileNotFoundError(
        f"dataset {name}: no prepared copy in {prepare_lib.output_dir(name, data_dir)} and the "
        f"raw dataset directory config.data.manual_dir={layout_dir} does not exist. "
        f"{builders.BUILDERS[name].MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if jax.process_index() == 0:
    log(f"preparing {name} from {layout_dir} into {data_dir} (first use)")
    prepare_lib.prepare(name, data_dir=data_dir, manual_dir=layout_dir)
  _sync("dataset prepared")
  return data_dir


def _tokenizer_path(config, raw_root: str | None) -> str:
  if config.data.tokenizer:
    return config.data.tokenizer
  if config.pretrained:
    return config.pretrained if os.path.isdir(config.pretrained) else os.path.dirname(
        os.path.abspath(config.pretrained))
  if raw_root is not None:
    return os.path.join(raw_root, "CUHK-PEDES")
  raise ValueError("config.data.tokenizer is not set and there is no config.pretrained "
                   "checkpoint to take the vocabulary from: set --config.data.tokenizer to a "
                   "bpe_simple_vocab_16e6.txt.gz file or a Hugging Face CLIP directory")


def setup_data(config) -> DataSetup:
  """Prepares the configured dataset if needed and loads its tokenizer."""
  if config.data.dataset == "synthetic":
    data_dir, raw_root = _ensure_synthetic(config)
  else:
    data_dir, raw_root = _ensure_real(config), None
  ctx = config.model.clip.context_length
  tokenizer = Tokenizer.from_pretrained(_tokenizer_path(config, raw_root), context_length=ctx)
  return DataSetup(dataset=config.data.dataset, data_dir=data_dir, tokenizer=tokenizer,
                   source_root=raw_root)
