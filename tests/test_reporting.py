"""Progress lines and curves show every loss term a method logs, not only IRRA's."""
from tipr_jax.training import reporting


def test_progress_line_lists_each_loss_term_and_accuracy():
  p = reporting.Progress(total_steps=10, global_batch=4)
  line = p.line(3, 1, {"loss": 5.0, "asdm_loss": 2.5, "efa_loss": 1.25, "mlm_acc": 0.5,
                       "lr": 1e-5, "finite": 1.0})
  fields = line.split(" | ")
  assert fields[:2] == ["step 3/10", "epoch 1"]
  assert fields[2:7] == ["loss 5", "asdm_loss 2.5", "efa_loss 1.25", "mlm_acc 0.5", "lr 1e-05"]
  assert "finite" not in line and "ETA" in fields[-1]


def test_progress_line_before_any_timed_step_shows_no_nan():
  p = reporting.Progress(total_steps=10, global_batch=4)
  line = p.line(1, 1, {"loss": 5.0, "lr": 1e-5, "tflops_per_s": float("nan")})
  assert "nan" not in line and line.endswith("ETA unknown"), line
  p.mark_compiled(1)
  p._t0 -= 2.0  # pylint: disable=protected-access  (two seconds since the compiling step)
  line = p.line(3, 1, {"loss": 5.0, "lr": 1e-5})
  assert "4.0 pairs/s" in line and "ETA 0:00:0" in line, line


def test_curves_plot_method_losses(tmp_path):
  rows = ['{"step": %d, "kind": "train", "loss": %f, "dcl_loss": %f}' % (s, 9 - s, 5 - s / 2)
          for s in range(1, 4)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  labels = []
  real_legend = plt.Axes.legend

  def spy(ax, *a, **k):
    labels.extend(h.get_label() for h in ax.get_lines())
    return real_legend(ax, *a, **k)

  plt.Axes.legend = spy
  try:
    assert reporting.plot_curves(tmp_path).endswith("training_curves.png")
  finally:
    plt.Axes.legend = real_legend
  assert "loss" in labels and "dcl_loss" in labels
