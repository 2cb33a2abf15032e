"""IRRA (the baseline) through the method-config interface, for side-by-side runs.

  python launch.py --config=configs/methods/irra.py:synthetic --workdir=runs/irra_synthetic
  arg = <dataset>[,smoke]   dataset: synthetic | cuhk | icfg | rstp

Exactly configs/<dataset>.py (the IRRA recipe on that dataset); benchmarks/results_table.py runs every
method as configs/methods/<method>.py:synthetic so that they share the budget.
"""
from configs import presets
from configs.methods import datasets


def get_config(arg: str | None = None):
  dataset, rest = datasets.split_arg(arg, "configs/methods/irra.py")
  datasets.check_presets(rest, ("smoke",), "configs/methods/irra.py")
  return presets.apply(datasets.dataset_config(dataset), ",".join(rest))
