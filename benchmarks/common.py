"""What every benchmark shares: writing its section of docs/performance.md, process memory
counters, the machine's load, and the random IRRA-shaped batches the step benchmarks time.

No JAX or torch import at module level: benchmark workers pick their framework.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
PERFORMANCE_DOC = REPO_ROOT / "docs" / "performance.md"
NOTES = "### Findings"  # a hand-written subsection at the end of a section survives a re-run


def write_section(title: str, body: str, doc: Path = PERFORMANCE_DOC) -> Path:
  """Replaces the section that starts with the line `title` (up to the next '## ' heading or the
  end of the file) by `body`, or appends `body` if there is no such section. `body` includes its
  title line. A '### Findings' subsection at the end of the old section is kept. Returns `doc`."""
  text = doc.read_text(encoding="utf-8") if doc.exists() else "# Performance\n"
  pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
  found = pattern.search(text)
  if found:
    notes = found.group(0).find(NOTES)
    if notes >= 0:
      body = body.rstrip("\n") + "\n\n" + found.group(0)[notes:]
    text = pattern.sub(lambda _: body.rstrip("\n") + "\n\n", text, count=1)
  else:
    text = text.rstrip("\n") + "\n\n" + body.rstrip("\n") + "\n"
  doc.parent.mkdir(parents=True, exist_ok=True)
  doc.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
  return doc


def status_kb(key: str) -> int:
  """A `/proc/self/status` counter in KiB (VmRSS, VmHWM, ...)."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(key + ":"):
      return int(line.split()[1])
  raise KeyError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> None:
  """Resets this process's VmHWM to its current RSS (Linux /proc/self/clear_refs)."""
  Path("/proc/self/clear_refs").write_text("5")


def uptime() -> str:
  """`uptime` (the load averages), or 'n/a'."""
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "n/a" if not hasattr(os, "getloadavg") else str(os.getloadavg())


def masked_caption_batch(cfg, batch: int, pids: np.ndarray, cap: int | None = None,
                         seed: int = 0) -> dict[str, np.ndarray]:
  """A random batch shaped like IRRA's: N(0, 1) images [B,H,W,3] float32, captions of 20-50 BPE
  ids between SOT (vocab-2) and EOT (vocab-1), their MLM-masked copies with the reference's rule
  (mask id vocab-3) and labels [B,L] int32, the given pids [B] and image ids 0..B-1.

  cap: if given, a caption with more masked positions than `cap` is re-masked until it fits (the
  engine's MLM head runs on at most `cap` positions per caption without a fallback then).
  """
  from tipr_jax.data.masking import mlm_mask_batch  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  v, ctx = cfg.vocab_size, cfg.context_length
  sot, eot, mask_id = v - 2, v - 1, v - 3
  ids = np.zeros((batch, ctx), np.int32)
  for i in range(batch):
    n = min(int(rng.integers(20, 51)), ctx - 2)
    ids[i, 0], ids[i, n + 1] = sot, eot
    ids[i, 1:n + 1] = rng.integers(1, mask_id, n)
  mlm_ids, labels = mlm_mask_batch(ids, rng, mask_id=mask_id)
  for i in range(batch if cap is not None else 0):
    while (labels[i] > 0).sum() > cap:
      mlm_ids[i], labels[i] = [a[0] for a in mlm_mask_batch(ids[i:i + 1], rng, mask_id=mask_id)]
  h, w = cfg.image_size
  return dict(images=rng.standard_normal((batch, h, w, 3), dtype=np.float32),
              caption_ids=ids, mlm_ids=mlm_ids.astype(np.int32),
              mlm_labels=labels.astype(np.int32), pids=np.asarray(pids, np.int32),
              image_ids=np.arange(batch, dtype=np.int32))
