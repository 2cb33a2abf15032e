"""benchmarks.results_table: mean ± sample std over seeds, the rendered table, kept notes."""
import math

import pytest

from benchmarks import results_table as rt


def _results(r1: float, best_r1: float | None = None) -> dict:
  metrics = dict(R1=r1, R5=2 * r1, R10=3 * r1, mAP=r1 + 1, mINP=r1 / 2, step=480)
  config = dict(
      data=dict(synthetic=dict(identities=600, images_per_identity=4, seed=0,
                               image_size=[192, 64]), augment=True),
      model=dict(clip=dict(embed_dim=128, image_size=[96, 32], patch_size=8, vision_layers=4,
                           vision_width=128, text_layers=3, text_width=128, context_length=48,
                           dtype="float32"), cmt_depth=2),
      optim=dict(name="adam", lr=5e-4, eps=1e-8, weight_decay=4e-5, schedule="cosine",
                 schedule_unit="step", warmup_epochs=1),
      train=dict(batch_size=64, num_epochs=8, max_steps=0, best_split="val"))
  out = dict(last=metrics, config=config, chance=dict(R1=1.8, R5=8.0, R10=15.7, mAP=3.8,
                                                      mINP=2.2))
  if best_r1 is not None:
    out["best"] = dict(metrics, R1=best_r1, step=360, chosen_on="val")
  return out


def test_mean_std_is_the_sample_std():
  mean, std = rt.mean_std([1.0, 2.0, 4.0])
  assert mean == pytest.approx(7 / 3)
  assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
  assert math.isnan(rt.mean_std([3.0])[1])
  assert rt.fmt(2.0, 0.5) == "2.00 ± 0.50" and rt.fmt(2.0, math.nan) == "2.00"


def test_render_reports_best_and_last_rows_and_commands():
  rows = {"irra": [_results(8.0, 6.0), _results(10.0, 9.0)],
          "ucfa": [_results(4.0), _results(6.0)]}
  commands = {m: {s: f"python launch.py {m} {s}" for s in (1, 2)} for m in rows}
  text = rt.render(rows, commands, "default", [], [1, 2])
  best = text[text.index("## Checkpoint chosen"):text.index("## Last step")]
  last = text[text.index("## Last step"):text.index("## Runs")]
  assert "| irra | 7.50 ± 2.12 |" in best       # best-on-val R1 of the two seeds: 6 and 9
  assert "| ucfa | 5.00 ± 1.41 |" in best       # no best entry: the last step stands in
  assert "| irra | 9.00 ± 1.41 |" in last
  assert "python launch.py ucfa 2" in text and "Chance level: R1 1.80" in text
  assert "600 identities x 4 images" in text and "batch 64, 8 epochs" in text


def test_main_keeps_the_hand_written_notes(tmp_path, monkeypatch):
  out = tmp_path / "results.md"
  out.write_text(f"# old table\n\n{rt.NOTES}\n\nwhat the numbers say\n")
  monkeypatch.setattr(rt, "run_one", lambda cmd, workdir, force: _results(5.0, 4.0))
  rt.main(["--methods=irra", "--seeds=1,2", f"--output={out}", f"--runs={tmp_path}"])
  text = out.read_text()
  assert "# old table" not in text and "| irra | 4.00 ± 0.00 |" in text
  assert text.endswith(f"{rt.NOTES}\n\nwhat the numbers say\n")
