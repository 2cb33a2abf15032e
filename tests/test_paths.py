"""Workdir files reach a bucket through etils.epath (gs:// simulated by epath's own test mock)."""
import json
import os

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from tipr_jax.training import paths, reporting


class _FakeSummaryWriter:
  """tensorboardX writes gs:// itself (with google-cloud-storage); here it only records its dir."""
  logdirs = []

  def __init__(self, logdir):
    self.logdirs.append(logdir)

  def add_scalar(self, *args):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def test_resolve_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.resolve("gs://bucket/run")) == "gs://bucket/run"
  assert os.fspath(paths.resolve("runs/x")) == os.fspath(tmp_path / "runs" / "x")
  assert paths.is_uri("gs://b/x") and not paths.is_uri("/data/x")


def test_write_text_atomic_replaces_a_local_file_whole(tmp_path):
  target = tmp_path / "sub" / "results.json"
  paths.write_text_atomic(target, '{"a": 1}')
  paths.write_text_atomic(target, '{"a": 2}')
  assert json.loads(target.read_text()) == {"a": 2}
  assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]  # no temp left


def test_metrics_curves_and_results_in_a_bucket_go_through_epath(tmp_path, monkeypatch):
  """With epath's mock, a gs:// path is served by the local file system under the working
  directory ('gs:/bucket/run'); every open must come through epath with the gs:// name."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr("tensorboardX.SummaryWriter", _FakeSummaryWriter)
  opened = []

  def record_open(original, path, mode):
    opened.append((os.fspath(path), mode))
    return original(path, mode)

  with epath_testing.mock_epath(open=record_open):
    writer = reporting.MetricsWriter("gs://bucket/run")
    writer.write(1, {"loss": 3.0})
    writer.write(2, {"R1": 5.0}, kind="val")
    writer.close()
    resumed = reporting.MetricsWriter("gs://bucket/run")  # a resumed run keeps the old rows
    resumed.write(3, {"loss": 2.0})
    resumed.close()
    png = reporting.plot_curves("gs://bucket/run")
    paths.write_text_atomic(paths.resolve("gs://bucket/run") / "results.json", '{"R1": 5.0}')
    assert epath.Path("gs://bucket/run/results.json").exists()

  local = tmp_path / "gs:" / "bucket" / "run"
  rows = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["kind"] == "val"
  assert (local / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((local / "results.json").read_text()) == {"R1": 5.0}
  assert png == "gs://bucket/run/training_curves.png"
  names = {p for p, _ in opened}
  for name in ("metrics.jsonl", "training_curves.png", "results.json"):
    assert f"gs://bucket/run/{name}" in names, (name, opened)
  assert _FakeSummaryWriter.logdirs[-1] == "gs://bucket/run/tensorboard"


def test_plot_curves_skips_a_line_cut_by_a_kill(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 2.0}\n{"step": 2, "ki')
  assert reporting.plot_curves(tmp_path) == os.fspath(tmp_path / "training_curves.png")


@pytest.mark.parametrize("workdir", ["gs://bucket/run", "relative/run"])
def test_checkpoint_directories_keep_the_workdir_scheme(workdir, tmp_path, monkeypatch):
  from tipr_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"init_from: .*does not exist"):
    with epath_testing.mock_epath():
      checkpointing.find_params_dir(workdir)
  if paths.is_uri(workdir):
    with epath_testing.mock_epath():
      (epath.Path(workdir) / "best" / "7" / "params").mkdir(parents=True)
      assert os.fspath(checkpointing.find_params_dir(workdir)) == f"{workdir}/best/7/params"
