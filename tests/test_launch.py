"""launch.py end to end on the synthetic smoke config: train, evaluate, resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cmd(workdir, data_root, *extra, config="configs/synthetic.py:smoke"):
  return [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / config}",
          f"--workdir={workdir}", f"--config.data.manual_dir={data_root}/raw",
          f"--config.data.data_dir={data_root}/tfds", *extra]


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  return env


def _run(cmd, timeout=600):
  return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return tmp_path_factory.mktemp("smoke_data")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_root):
  workdir = tmp_path_factory.mktemp("full")
  proc = _run(_cmd(workdir, data_root))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return workdir, proc


def _final_params(workdir):
  import orbax.checkpoint as ocp
  ckpt_root = Path(workdir) / "checkpoints"
  last = max(int(d.name) for d in ckpt_root.iterdir() if d.name.isdigit())
  state = ocp.PyTreeCheckpointer().restore(str(ckpt_root / str(last) / "state"))
  return last, state["params"]


def test_smoke_training_reports_metrics(full_run):
  workdir, proc = full_run
  results = json.loads((Path(workdir) / "results.json").read_text())
  for key in ("R1", "R5", "R10", "mAP", "mINP"):
    assert 0.0 <= results["last"][key] <= 100.0
    assert key in results["chance"]
  assert "chance level" in proc.stdout
  assert "pairs/s" in proc.stdout and "ETA" in proc.stdout
  assert (Path(workdir) / "training_curves.png").stat().st_size > 0
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  assert any(r["kind"] == "train" and "loss" in r for r in rows)
  assert list((Path(workdir) / "tensorboard").iterdir())


def test_sigkill_then_rerun_resumes_bitwise(full_run, tmp_path, data_root):
  ref_dir, _ = full_run
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(workdir, data_root), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = workdir / "checkpoints"
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d.name) for d in ckpt.iterdir() if d.name.isdigit()] if ckpt.exists() else []
    if steps and max(steps) >= 4:
      break
    time.sleep(0.2)
  assert proc.poll() is None, "run ended before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  rerun = _run(_cmd(workdir, data_root))
  assert rerun.returncode == 0, rerun.stderr[-5000:]
  assert "resumed from" in rerun.stdout
  step_a, params_a = _final_params(ref_dir)
  step_b, params_b = _final_params(workdir)
  assert step_a == step_b
  import jax
  flat_a = jax.tree_util.tree_leaves_with_path(params_a)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(params_b))
  for path, leaf in flat_a:
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]), err_msg=str(path))


def test_unknown_config_key_is_named(tmp_path, data_root):
  proc = _run(_cmd(tmp_path, data_root, "--config.optim.learning_rate=1"))
  assert proc.returncode != 0
  assert "learning_rate" in proc.stderr


def test_missing_dataset_directory_is_named(tmp_path):
  proc = _run([sys.executable, str(ROOT / "launch.py"), f"--config={ROOT}/configs/cuhk.py:smoke",
               f"--workdir={tmp_path}/w", f"--config.data.manual_dir={tmp_path}/nowhere",
               f"--config.data.data_dir={tmp_path}/tfds"])
  assert proc.returncode != 0
  assert f"{tmp_path}/nowhere" in proc.stderr and "cuhk_pedes" in proc.stderr


def test_checkpoint_that_does_not_fit_is_named(full_run, tmp_path, data_root):
  ref_dir, _ = full_run
  proc = _run(_cmd(tmp_path / "eval", data_root, "--config.eval_only=True",
                   f"--config.init_from={ref_dir}", "--config.model.clip.embed_dim=48"))
  assert proc.returncode != 0
  assert "does not fit" in proc.stderr and "base_model" in proc.stderr


def test_eval_only_reproduces_the_final_test_metrics(full_run, tmp_path, data_root):
  ref_dir, _ = full_run
  proc = _run(_cmd(tmp_path / "eval", data_root, "--config.eval_only=True",
                   f"--config.init_from={ref_dir}"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads((tmp_path / "eval" / "results.json").read_text())["eval_only"]
  ref = json.loads((Path(ref_dir) / "results.json").read_text())
  expected = ref["best"] if "best" in ref else ref["last"]
  for k in ("R1", "mAP"):
    assert got[k] == pytest.approx(expected[k], abs=1e-6)


def test_non_finite_loss_stops_and_keeps_only_finite_checkpoints(tmp_path, data_root):
  workdir = tmp_path / "nan"
  proc = _run(_cmd(workdir, data_root, "--config.optim.lr=1e30"))
  assert proc.returncode != 0
  assert "non-finite loss" in proc.stderr
  ckpt = workdir / "checkpoints"
  if ckpt.exists():
    import orbax.checkpoint as ocp
    import jax
    for d in ckpt.iterdir():
      if d.name.isdigit():
        state = ocp.PyTreeCheckpointer().restore(str(d / "state"))
        assert all(np.all(np.isfinite(np.asarray(x)))
                   for x in jax.tree_util.tree_leaves(state["params"]))
