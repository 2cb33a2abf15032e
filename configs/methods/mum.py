"""MUM / UMSA (multi-modal uncertainty + cross-modal circle loss; spec seed-methods.md §B).

  python launch.py --config=configs/methods/mum.py:cuhk --workdir=runs/mum_cuhk
  arg = <dataset>[,<preset>...]   dataset: synthetic | cuhk | icfg | rstp

Defaults = the spec's reconstruction (docs/methods_probabilistic.md §3): IRRA's SDM + ID + MLM on the
deterministic features + the bi-directional cross-modal circle loss (m = 0.25, gamma = 64) on
features augmented with batch- and identity-level variance (lambda_b = lambda_id = 1, one sample)
+ global masked-token recovery (cosine). The optimizer, schedule and budget are the dataset's IRRA
recipe (configs/<dataset>.py), so 'synthetic' compares with IRRA at the same budget.
Presets (combinable): gamma128 (circle scale 128), infonce (InfoNCE recovery), smoke (tiny).
"""
from ml_collections import config_dict

from configs import presets
from configs.methods import datasets

PRESETS = ("gamma128", "infonce", "smoke")


def mum_section() -> config_dict.ConfigDict:
  """config.mum: the switches read by tipr_jax/methods/mum.py."""
  return config_dict.ConfigDict(dict(
      num_aug_samples=1,     # augmentation samples per step (circle loss averaged over them)
      lambda_batch=1.0,      # weight of the batch-level variance
      lambda_id=1.0,         # weight of the identity-level variance (0 for a singleton id)
      unbiased=True,         # variance estimator n - 1 (torch.var / DSU)
      circle_margin=0.25,    # m
      circle_gamma=64.0,     # scale (spec: 64 or 128)
      recovery="cosine",     # global recovery: cosine | infonce
  ))


def get_config(arg: str | None = None):
  dataset, rest = datasets.split_arg(arg, "configs/methods/mum.py")
  datasets.check_presets(rest, PRESETS, "configs/methods/mum.py")
  c = datasets.dataset_config(dataset)
  c.method = "mum"
  c.mum = mum_section()
  c.losses.circle = 1.0
  c.losses.gmr = 1.0
  for name in rest:
    if name == "gamma128":
      c.mum.circle_gamma = 128.0
    elif name == "infonce":
      c.mum.recovery = "infonce"
  return presets.apply(c, ",".join(n for n in rest if n == "smoke"))
