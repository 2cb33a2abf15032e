"""Training output on process 0: JSON-lines metrics, TensorBoard events, progress lines, curves."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from tipr_jax.training import paths
from tipr_jax.training.throughput import throughput_metrics


def _plain(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)) and np.ndim(v) == 0:
    return v.item()
  if isinstance(v, jax.Array) and v.ndim == 0:
    return np.asarray(v).item()
  return v


class MetricsWriter:
  """Writes `metrics.jsonl` and TensorBoard event files in `workdir` (process 0 only).

  A local metrics.jsonl is appended to; in a bucket (objects cannot be appended to) the file is
  rewritten whole at every write, which is cheap at logging frequency.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._remote_path = None
    self._remote_text = ""
    if self.active:
      root = paths.resolve(workdir)
      root.mkdir(parents=True, exist_ok=True)
      if paths.is_uri(root):
        self._remote_path = root / "metrics.jsonl"
        self._remote_text = self._remote_path.read_text() if self._remote_path.exists() else ""
      else:
        self._jsonl = open(os.fspath(root / "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.fspath(root / "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
    if not self.active:
      return
    row = {"step": int(step), "kind": kind, **{k: _plain(v) for k, v in metrics.items()}}
    if self._remote_path is not None:
      self._remote_text += json.dumps(row) + "\n"
      self._remote_path.write_text(self._remote_text)
    else:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    for k, v in row.items():
      if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(f"{kind}/{k}", v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


class Progress:
  """Progress lines: step, loss, lr, pairs/s and ETA; compile steps excluded from the rate."""

  def __init__(self, total_steps: int, global_batch: int, start_step: int = 0, *,
               flops_per_pair: float = 0.0, num_devices: int = 1, device_kind: str = "cpu"):
    self.total = total_steps
    self.batch = global_batch
    self.flops_per_pair = flops_per_pair
    self.num_devices = num_devices
    self.device_kind = device_kind
    self._t0 = None
    self._s0 = start_step

  def mark_compiled(self, step: int) -> None:
    """Starts the clock after the first (compiling) step."""
    self._t0, self._s0 = time.perf_counter(), step

  def rate(self, step: int) -> float:
    if self._t0 is None or step <= self._s0:
      return float("nan")
    return (step - self._s0) / (time.perf_counter() - self._t0)

  def throughput(self, step: int) -> dict[str, float]:
    """pairs/s (total, per device), achieved TFLOP/s and MFU (known device kinds only)."""
    return throughput_metrics(self.rate(step) * self.batch, num_devices=self.num_devices,
                              flops_per_pair=self.flops_per_pair, device_kind=self.device_kind)

  def line(self, step: int, epoch: int, metrics: dict[str, float]) -> str:
    steps_per_s = self.rate(step)
    eta = (self.total - step) / steps_per_s if steps_per_s == steps_per_s and steps_per_s else 0
    parts = [f"step {step}/{self.total}", f"epoch {epoch}"]
    for k in _loss_keys(metrics) + [k for k in metrics if k.endswith("_acc")] + ["lr"]:
      if k in metrics:
        parts.append(f"{k} {metrics[k]:.4g}")
    if steps_per_s != steps_per_s:  # no timed step yet (the first step compiles)
      parts.append("pairs/s after the compiling step")
      parts.append("ETA unknown")
      return " | ".join(parts)
    parts.append(f"{steps_per_s * self.batch:.1f} pairs/s")
    if "tflops_per_s" in metrics and metrics["tflops_per_s"] == metrics["tflops_per_s"]:
      parts.append(f"{metrics['tflops_per_s']:.3g} TFLOP/s")
    parts.append(f"MFU {metrics['mfu']:.1%}" if "mfu" in metrics else "MFU unknown")
    parts.append(f"ETA {_fmt_time(eta)}")
    return " | ".join(parts)


def _loss_keys(row: dict) -> list[str]:
  """'loss' then every method term ('sdm_loss', 'efa_loss', 'dcl_loss', ...) in logging order."""
  return (["loss"] if "loss" in row else []) + [k for k in row if k.endswith("_loss")]


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}"


def log(msg: str) -> None:
  """Prints on process 0."""
  if jax.process_index() == 0:
    print(msg, flush=True)
    sys.stdout.flush()


def plot_curves(workdir: str | os.PathLike, out_png: str | None = None) -> str | None:
  """Training loss and evaluation R@1 / mAP against step, from metrics.jsonl -> PNG path."""
  path = paths.resolve(workdir) / "metrics.jsonl"
  if not path.exists():
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  train, evals = [], []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # blank, or a last line cut short by a kill mid-write
      continue
    (train if row.get("kind") == "train" else evals).append(row)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for key in dict.fromkeys(k for r in train for k in _loss_keys(r)):
    pts = [(r["step"], r[key]) for r in train if key in r]
    if pts:
      axes[0].plot(*zip(*pts), label=key)
  axes[0].set_xlabel("step")
  axes[0].set_title("training losses")
  axes[0].legend()
  for key in ("R1", "R5", "mAP"):
    for kind in sorted({r["kind"] for r in evals}):
      pts = [(r["step"], r[key]) for r in evals if r["kind"] == kind and key in r]
      if pts:
        axes[1].plot(*zip(*pts), marker="o", label=f"{kind} {key}")
  axes[1].set_xlabel("step")
  axes[1].set_title("retrieval (text to image), %")
  axes[1].legend()
  fig.tight_layout()
  out = paths.resolve(out_png or paths.resolve(workdir) / "training_curves.png")
  with out.open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
  return os.fspath(out)
