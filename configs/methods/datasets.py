"""Dataset selection shared by the method configs: 'synthetic' | 'cuhk' | 'icfg' | 'rstp'.

`split_arg('cuhk,paper,smoke')` -> ('cuhk', ['paper', 'smoke']); `dataset_config('cuhk')` is
configs/cuhk.get_config() (the IRRA recipe on that dataset) without presets.
"""
from __future__ import annotations

from configs import cuhk, icfg, rstp, synthetic

DATASETS = {"synthetic": synthetic, "cuhk": cuhk, "icfg": icfg, "rstp": rstp}


def split_arg(arg: str | None, config_file: str) -> tuple[str, list[str]]:
  """(dataset, presets) from 'dataset[,preset...]'; the dataset is required."""
  names = [a.strip() for a in (arg or "").split(",") if a.strip()]
  if not names or names[0] not in DATASETS:
    raise ValueError(f"{config_file}: the config argument must start with a dataset, one of "
                     f"{sorted(DATASETS)} (e.g. '{config_file}:synthetic,smoke'), got {arg!r}")
  return names[0], names[1:]


def dataset_config(name: str):
  """The dataset's IRRA config (no presets applied)."""
  return DATASETS[name].get_config(None)


def check_presets(presets: list[str], known: tuple[str, ...], config_file: str) -> None:
  """Raises ValueError naming the first preset not in `known`."""
  for p in presets:
    if p not in known:
      raise ValueError(f"{config_file}: unknown preset {p!r}; known: {', '.join(known)}")
