"""The multi-host path, on one machine: two processes x 4 CPU devices form one 8-device job.

What runs (tests/multihost_worker.py is launch.py plus the device count and a file-write audit):
  reference  one process with 8 CPU devices: the smoke training for STEPS steps, then evaluation;
  phase A    two processes joined by jax.distributed over localhost (gloo CPU collectives), the
             same training, SIGKILLed (both) once a checkpoint exists;
  phase B    both restarted with the same command: they resume and run to the end.
With TIPR_DEBUG_BATCH_LOG every process records the rows it feeds to each training step and each
evaluation batch (tipr_jax/training/batch_log.py); the audit log records the files each process
opens for writing. Run alone: `.venv/bin/python -m pytest tests/test_multihost.py`.

Config: the synthetic smoke preset (tiny CLIP), 4 images per identity (so the 8-image gallery and
16 queries split over both processes), global batch 8, a checkpoint every 2 steps, STEPS = 6
(fewer than an epoch: the only evaluation is the final one), Adam eps 1e-3 (the reference's value;
see test_final_parameters_match for why not the synthetic config's 1e-8).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
STEPS = 6
CKPT_EVERY = 2
TIMEOUT = 600  # per phase; a hung collective (one process gone) fails instead of blocking CI


def _overrides(data_root: Path) -> list[str]:
  return [f"--config={ROOT}/configs/synthetic.py:smoke",
          f"--config.data.manual_dir={data_root}/raw", f"--config.data.data_dir={data_root}/tfds",
          "--config.data.synthetic.images_per_identity=4", "--config.data.eval_batch_size=8",
          f"--config.train.max_steps={STEPS}",
          f"--config.train.checkpoint_every_steps={CKPT_EVERY}", "--config.optim.eps=1e-3"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: Path, data_root: Path, logs: Path, tag: str, *, process_id: int = 0,
           num_processes: int = 1, port: int = 0) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TIPR_LOCAL_DEVICES=str(8 // num_processes),
             TIPR_DEBUG_BATCH_LOG=str(logs / f"batches_{tag}"),
             TIPR_AUDIT_LOG=str(logs / f"audit_{tag}_{process_id}.jsonl"))
  # No persistent compilation cache: a process that loads a program from it while the other
  # compiles reaches the first collective first, and gloo gives the other only 30 s to join.
  if num_processes > 1:
    env.update(TIPR_COORDINATOR=f"127.0.0.1:{port}", TIPR_NUM_PROCESSES=str(num_processes),
               TIPR_PROCESS_ID=str(process_id))
  out = open(logs / f"stdout_{tag}_{process_id}.txt", "w")
  return subprocess.Popen([sys.executable, str(WORKER), f"--workdir={workdir}",
                           *_overrides(data_root)], cwd=ROOT, env=env, stdout=out,
                          stderr=subprocess.STDOUT)


def _tail(logs: Path, tag: str, process_id: int, whole: bool = False) -> str:
  text = (logs / f"stdout_{tag}_{process_id}.txt").read_text()
  return text if whole else text[-4000:]


def _wait_all(procs: list[subprocess.Popen], logs: Path, tag: str) -> None:
  deadline = time.time() + TIMEOUT
  try:
    for i, p in enumerate(procs):
      p.wait(timeout=max(deadline - time.time(), 1))
      assert p.returncode == 0, f"{tag} process {i} failed:\n{_tail(logs, tag, i)}"
  finally:
    _kill(procs)


def _kill(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      os.kill(p.pid, signal.SIGKILL)
      p.wait()


def _checkpoint_steps(workdir: Path) -> list[int]:
  root = workdir / "checkpoints"
  return sorted(int(d.name) for d in root.iterdir() if d.name.isdigit()) if root.exists() else []


def _prepare_data(data_root: Path) -> None:
  """Generates and prepares the dataset once, so concurrent jobs never race to create it."""
  sys.path.insert(0, str(ROOT))
  from configs import synthetic
  from tipr_jax.training import data_setup
  config = synthetic.get_config("smoke")
  config.data.manual_dir = str(data_root / "raw")
  config.data.data_dir = str(data_root / "tfds")
  config.data.synthetic.images_per_identity = 4
  data_setup.setup_data(config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("multihost")
  data_root, logs = base / "data", base / "logs"
  logs.mkdir()
  _prepare_data(data_root)
  ref_dir, multi_dir = base / "reference", base / "multi"
  t0 = time.time()
  port = _free_port()
  phase_a = [_start(multi_dir, data_root, logs, "A", process_id=i, num_processes=2, port=port)
             for i in range(2)]
  try:
    deadline = time.time() + TIMEOUT
    while not _checkpoint_steps(multi_dir) and time.time() < deadline:
      for i, p in enumerate(phase_a):
        assert p.poll() is None, f"phase A process {i} ended early:\n{_tail(logs, 'A', i)}"
      time.sleep(0.1)
    assert _checkpoint_steps(multi_dir), "phase A wrote no checkpoint in time"
    running = [p.poll() is None for p in phase_a]
  finally:
    _kill(phase_a)
  assert all(running), "phase A finished before it could be killed: the resume is not tested"
  port = _free_port()
  phase_b = [_start(multi_dir, data_root, logs, "B", process_id=i, num_processes=2, port=port)
             for i in range(2)]
  _wait_all(phase_b, logs, "B")
  resumed = re.search(r"resumed from .*/checkpoints/(\d+)\n", _tail(logs, "B", 0, whole=True))
  assert resumed, "phase B did not resume from a checkpoint:\n" + _tail(logs, "B", 0)
  resumed_from = int(resumed.group(1))
  assert CKPT_EVERY <= resumed_from < STEPS
  # The one-process run goes last, not beside phase A: on a 2-core machine a third busy process
  # slows the two whose first collectives must meet within gloo's 30 s.
  _wait_all([_start(ref_dir, data_root, logs, "reference")], logs, "reference")
  print(f"multi-host runs took {time.time() - t0:.0f} s")
  return dict(ref=ref_dir, multi=multi_dir, logs=logs, resumed_from=resumed_from)


def _records(directory: Path, process: int) -> list[dict]:
  path = directory / f"process_{process}.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _train_rows(directory: Path, process: int) -> dict[int, list[dict]]:
  """step -> every record of that step (a step replayed after a restart appears twice)."""
  out: dict[int, list[dict]] = {}
  for r in _records(directory, process):
    if r["kind"] == "train":
      out.setdefault(r["step"], []).append(r)
  return out


def test_processes_read_disjoint_parts_that_cover_each_global_batch(runs):
  # Fails if a process reads the other's rows (the concatenation repeats rows and misses others),
  # reads a whole global batch (wrong length), or reads a shifted/reshuffled stream: the one-process
  # run's global batch is the reference for each step, row by row (images, ids and masks hashed).
  logs = runs["logs"]
  ref = _train_rows(logs / "batches_reference", 0)
  assert sorted(ref) == list(range(1, STEPS + 1))
  local = {}
  for p in (0, 1):
    rows = _train_rows(logs / "batches_A", p)
    for step, recs in _train_rows(logs / "batches_B", p).items():
      rows.setdefault(step, []).extend(recs)
    assert sorted(rows) == list(range(1, STEPS + 1)), (p, sorted(rows))
    for step, recs in rows.items():
      # A step run before the kill and again after the restart read the same rows.
      assert all(r["rows"] == recs[-1]["rows"] for r in recs), (p, step)
    local[p] = {s: recs[-1] for s, recs in rows.items()}
  for step in range(1, STEPS + 1):
    full = ref[step][0]
    p0, p1 = local[0][step], local[1][step]
    assert len(p0["rows"]) == len(p1["rows"]) == len(full["rows"]) // 2
    assert p0["rows"] + p1["rows"] == full["rows"], f"step {step}"
    assert p0["image_ids"] + p1["image_ids"] == full["image_ids"], f"step {step}"
    assert not set(p0["rows"]) & set(p1["rows"]), f"step {step}: both processes read a row"


def test_checkpoint_restores_in_both_processes(runs):
  # After the restart each process's first step is the one after the checkpoint: a process that
  # did not restore would start at step 1 (and the job would deadlock or diverge); its rows are
  # checked against the reference in the test above, so the Grain iterator state was restored too.
  logs = runs["logs"]
  for p in (0, 1):
    steps = sorted(_train_rows(logs / "batches_B", p))
    assert steps == list(range(runs["resumed_from"] + 1, STEPS + 1)), (p, steps)
  assert "resumed from" in _tail(logs, "B", 0)


def _train_losses(workdir: Path) -> dict[int, list[float]]:
  out: dict[int, list[float]] = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if row["kind"] == "train":
      out.setdefault(row["step"], []).append(row["loss"])
  return out


def test_losses_match_one_process(runs):
  # The gradient all-reduce runs over gloo between processes and inside XLA in one process, so
  # sums differ in the last bits (seen: loss equal or 1-2 ulp apart). A wrong batch, a missed
  # or doubled gradient shard, or a wrong step counter moves the loss by O(0.1-1) (step losses
  # here range over ~37-42), far outside the tolerance.
  ref, multi = _train_losses(runs["ref"]), _train_losses(runs["multi"])
  assert sorted(ref) == sorted(multi) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    for loss in multi[step]:  # replayed steps logged twice: both must match
      np.testing.assert_allclose(loss, ref[step][-1], rtol=1e-6, atol=1e-5, err_msg=f"step {step}")


def _abstract_params(workdir: Path):
  import orbax.checkpoint as ocp
  step = _checkpoint_steps(workdir)[-1]
  meta = ocp.StandardCheckpointer().metadata(str(workdir / "checkpoints" / str(step) / "state"))
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])


def test_final_parameters_match(runs):
  # The multi-process checkpoint (written by 8 devices of 2 processes) is read here by one process
  # through the engine's own load_params. Fails if the resumed run's parameters differ by more
  # than float rounding: a resume from the wrong step, optimizer state or data position, or a
  # gradient reduced over only one process's devices, changes parameters by ~lr (1e-5..1e-4) per
  # step. Why eps 1e-3: the key bias of attention gets an exactly-zero true gradient (softmax
  # ignores it), so its computed gradient is rounding noise that depends on the reduction order;
  # Adam with eps 1e-8 scales that noise to a full lr-sized step (seen: 1.2e-4 apart after 6
  # steps); with eps 1e-3 it stays ~1e-10.
  from tipr_jax.training import checkpointing
  assert _checkpoint_steps(runs["ref"])[-1] == _checkpoint_steps(runs["multi"])[-1] == STEPS
  abstract = _abstract_params(runs["ref"])
  ref = checkpointing.load_params(str(runs["ref"]), abstract)
  multi = checkpointing.load_params(str(runs["multi"]), abstract)
  worst, bitwise = 0.0, True
  for path, a in jax.tree_util.tree_leaves_with_path(ref):
    b = dict(jax.tree_util.tree_leaves_with_path(multi))[path]
    diff = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    worst, bitwise = max(worst, diff), bitwise and np.array_equal(a, b)
    assert diff <= 1e-5, f"{jax.tree_util.keystr(path)}: max abs difference {diff}"
  print(f"final parameters: max abs difference {worst:.3g}, bitwise equal: {bitwise}")


_ATOMIC_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")  # paths.write_text_atomic's temp


def _final_name(rel: str) -> str:
  """A temporary file that is renamed over its target counts as a write of the target."""
  head, base = os.path.split(rel)
  m = _ATOMIC_TEMP.match(base)
  return os.path.join(head, m["name"]) if m else rel


def _written_under(logs: Path, workdir: Path, process: int) -> set[str]:
  paths = set()
  for tag in ("A", "B"):
    path = logs / f"audit_{tag}_{process}.jsonl"
    for line in path.read_text().splitlines():
      p = json.loads(line)["path"]
      if p.startswith(str(workdir) + os.sep):
        paths.add(_final_name(os.path.relpath(p, workdir)))
  return paths


def test_only_process_0_writes_logs_and_results(runs):
  # The audit hook sees every Python-level open-for-write and mkdir of each process. Fails if
  # process 1 writes metrics.jsonl, results.json, config.json, the curves or TensorBoard events
  # (on a real slice both would write the same bucket path, clobbering or duplicating rows).
  # Process 0 writing them is the positive control that the hook records these files at all.
  logs, workdir = runs["logs"], runs["multi"]
  mine = ("metrics.jsonl", "results.json", "config.json", "training_curves.png", "tensorboard")
  p0, p1 = _written_under(logs, workdir, 0), _written_under(logs, workdir, 1)
  assert not [p for p in p1 if p.split(os.sep)[0] in mine], sorted(p1)
  for name in ("metrics.jsonl", "results.json", "config.json"):
    assert name in p0, sorted(p0)
  assert any(p.startswith("tensorboard" + os.sep) for p in p0), sorted(p0)
  assert json.loads((workdir / "results.json").read_text())["last"]["step"] == STEPS


def _eval_indices(directory: Path, key: str) -> tuple[list[int], dict[int, list[int]]]:
  """(valid file positions over all processes, valid positions per process) of one eval pass."""
  per = {}
  for p in (0, 1):
    per[p] = [i for r in _records(directory, p) if r["kind"] == f"eval:{key}"
              for i, v in zip(r["index"], r["valid"]) if v]
  return sorted(per[0] + per[1]), per


@pytest.mark.parametrize("key", ["images", "caption_ids"])
def test_evaluation_covers_every_item_once(runs, key):
  # Fails if an item is encoded by both processes or by none (sorted union != 0..N-1 with N from
  # the one-process run), or if every process encodes everything (then one process alone covers
  # all of it). The final metrics are then those of the one-process run: same features, same
  # ranking (features differ in the last bits only; a tie flip would need two similarities within
  # ~1e-7 of each other).
  logs = runs["logs"]
  ref_all, _ = _eval_indices(logs / "batches_reference", key)
  n = len(ref_all)
  assert ref_all == list(range(n)) and n > 0
  multi_all, per = _eval_indices(logs / "batches_B", key)
  assert multi_all == list(range(n)), (key, per)
  assert per[0] and per[1], f"{key}: one process encoded nothing ({per})"
  ref = json.loads((runs["ref"] / "results.json").read_text())["last"]
  got = json.loads((runs["multi"] / "results.json").read_text())["last"]
  for k in ("R1", "R5", "mAP", "mINP"):
    assert got[k] == pytest.approx(ref[k], abs=1e-4), k
