r"""One process of a local multi-process (multi-host) job: launch.py with a few test hooks.

  TIPR_COORDINATOR=127.0.0.1:PORT TIPR_NUM_PROCESSES=2 TIPR_PROCESS_ID=0 TIPR_LOCAL_DEVICES=4 \
  TIPR_DEBUG_BATCH_LOG=/tmp/batches TIPR_AUDIT_LOG=/tmp/audit_0.jsonl \
  python tests/multihost_worker.py --config=configs/synthetic.py:smoke --workdir=/tmp/run ...

(and the same with TIPR_PROCESS_ID=1) forms one job of 2 x 4 CPU devices = one 8-device mesh;
tests/test_multihost.py starts, kills and restarts such pairs. Beyond launch.py this script:
- gives JAX TIPR_LOCAL_DEVICES CPU devices (jax_num_cpu_devices, set before any JAX operation;
  XLA_FLAGS --xla_force_host_platform_device_count as a fallback for older jax);
- with TIPR_AUDIT_LOG set, appends one JSON line per file or directory this process creates or
  opens for writing (Python-level `open`/`os.open`/`os.mkdir`, via an audit hook), so a test can
  tell which process wrote metrics.jsonl, results.json or TensorBoard events. Writes done inside
  C++ libraries (TensorStore array data of Orbax checkpoints) are not seen.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _install_audit_hook(log_path: str) -> None:
  """Records every write-mode open and mkdir of this process in `log_path` (JSON lines)."""
  log_path = os.path.abspath(log_path)
  busy = [False]  # the hook's own write to the log must not recurse

  def hook(event: str, args: tuple) -> None:
    if busy[0]:
      return
    path, writes = None, False
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
      path, mode, flags = args[0], args[1], args[2]
      if mode is not None:
        writes = any(c in str(mode) for c in "wax+")
      else:
        writes = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
    elif event == "os.mkdir":
      path, writes = args[0], True
    if not writes or path is None:
      return
    path = os.fsdecode(path)
    if os.path.abspath(path) == log_path:
      return
    busy[0] = True
    try:
      with open(log_path, "a") as f:
        f.write(json.dumps({"event": event, "path": os.path.abspath(path)}) + "\n")
    finally:
      busy[0] = False

  sys.addaudithook(hook)


def main() -> None:
  devices = int(os.environ.get("TIPR_LOCAL_DEVICES", "0"))
  if devices:
    flag = f"--xla_force_host_platform_device_count={devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  if os.environ.get("TIPR_AUDIT_LOG"):
    _install_audit_hook(os.environ["TIPR_AUDIT_LOG"])
  import jax
  if devices:
    jax.config.update("jax_num_cpu_devices", devices)
  sys.path.insert(0, ROOT)
  from absl import app
  import launch
  app.run(launch.main)


if __name__ == "__main__":
  main()
