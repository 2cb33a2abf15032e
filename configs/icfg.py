"""IRRA on ICFG-PEDES (no validation split: the best epoch is chosen on test). Presets: `:smoke`."""
from configs import base
from configs import presets


def get_config(arg: str | None = None):
  c = base.irra_config()
  c.data.dataset = "icfg_pedes"
  c.train.best_split = "test"
  return presets.apply(c, arg)
