r"""Trains and evaluates a text-to-image person retrieval model.

  python launch.py --config=configs/cuhk.py --workdir=runs/cuhk
  python launch.py --config=configs/synthetic.py --workdir=runs/synthetic --config.optim.lr=2e-4
  python launch.py --config=configs/cuhk.py --workdir=runs/eval \
      --config.eval_only=True --config.init_from=runs/cuhk

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_init_distributed() -> None:
  """Joins a multi-host job (TPU slice, or the coordinator set in the environment)."""
  import jax
  if os.environ.get("TIPR_COORDINATOR"):  # explicit multi-process (e.g. local CPU processes)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["TIPR_COORDINATOR"],
                               num_processes=int(os.environ["TIPR_NUM_PROCESSES"]),
                               process_id=int(os.environ["TIPR_PROCESS_ID"]))
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:  # multi-host TPU slice
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _maybe_init_distributed()
  logging.set_verbosity(logging.WARNING)  # keep library INFO chatter out of the progress lines
  from tipr_jax.training.loop import train_and_evaluate
  from tipr_jax.training.reporting import log
  config = _CONFIG.value
  log("config:\n" + str(config))
  train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  app.run(main)
