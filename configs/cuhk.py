"""IRRA on CUHK-PEDES, as the reference's published run. Presets: `configs/cuhk.py:smoke`."""
from configs import base
from configs import presets


def get_config(arg: str | None = None):
  c = base.irra_config()
  c.data.dataset = "cuhk_pedes"
  return presets.apply(c, arg)
