"""IRRA on RSTPReid, as the reference's published run. Presets: `configs/rstp.py:smoke`."""
from configs import base
from configs import presets


def get_config(arg: str | None = None):
  c = base.irra_config()
  c.data.dataset = "rstpreid"
  return presets.apply(c, arg)
