"""Seeds x methods on the synthetic benchmark under one budget -> docs/results.md (mean ± std).

  python -m benchmarks.results_table --methods=irra,ucfa,mum --seeds=1,2,3
  python -m benchmarks.results_table --methods=irra,fmfa,parts --seeds=1,2,3 --output=docs/results_fg.md
  python -m benchmarks.results_table --methods=irra,ucfa --seeds=1 --budget=smoke --output=/tmp/r.md

Every run is `python launch.py --config=configs/methods/<method>.py:synthetic[,<budget presets>]
--workdir=<runs>/<budget>/<method>/seed<seed> --config.seed=<seed> [--config.<key>=<value> ...]`, so
all methods share the data, the model size, the optimizer recipe and the number of epochs/steps of
configs/synthetic.py (each method config starts from it and only adds its own losses/heads); any
configs/methods/<name>.py that takes a dataset argument works. Runs are sequential; a run whose
workdir already holds results.json is reused (launch.py also resumes an interrupted run), unless
--force. The table reports the test metrics of the checkpoint chosen on the validation split (the
'best' entry of results.json; 'last' when the run has none) and of the last step, as the mean ±
sample standard deviation (ddof 1) over seeds, with each run's command.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
NOTES = "## Reading the table"  # a hand-written last section, kept on re-runs
BUDGETS = {  # name -> presets appended to the dataset argument of every method config
    "default": (),       # configs/synthetic.py as it is (the README's synthetic run)
    "smoke": ("smoke",),  # a tiny model for a few steps: checks the script, not the methods
}


def config_file(method: str) -> Path:
  path = REPO_ROOT / "configs" / "methods" / f"{method}.py"
  if not path.exists():
    raise FileNotFoundError(f"method {method!r}: no config file {path} (expected "
                            f"configs/methods/<method>.py with get_config('synthetic[,...]'))")
  return path


def run_tag(budget: str, overrides: list[str]) -> str:
  """Workdir subdirectory of a budget: its name, plus a short hash of the overrides if any."""
  if not overrides:
    return budget
  return f"{budget}-{hashlib.sha1(chr(0).join(overrides).encode()).hexdigest()[:8]}"


def run_command(method: str, seed: int, budget: str, workdir: Path, overrides: list[str]
                ) -> list[str]:
  """The launch.py command line of one run (paths relative to the repository root)."""
  arg = ",".join(("synthetic",) + BUDGETS[budget])
  cfg = config_file(method).relative_to(REPO_ROOT)
  return [sys.executable, "launch.py", f"--config={cfg}:{arg}", f"--workdir={workdir}",
          f"--config.seed={seed}", *[f"--config.{o}" for o in overrides]]


def display_command(cmd: list[str]) -> str:
  return " ".join(shlex.quote(c) for c in ["python"] + cmd[1:])


def run_one(cmd: list[str], workdir: Path, force: bool) -> dict:
  """Runs (or reuses) one training; returns its results.json."""
  results = workdir / "results.json"
  if results.exists() and not force:
    print(f"reusing {results}", flush=True)
  else:
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"running: {display_command(cmd)}", flush=True)
    with open(workdir / "launch.log", "w") as log:
      proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
      raise RuntimeError(f"run failed (exit {proc.returncode}); see {workdir / 'launch.log'}")
    print(f"  done in {(time.time() - start) / 60:.1f} min", flush=True)
  return json.loads(results.read_text())


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; nan for a single value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def fmt(mean: float, std: float) -> str:
  return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def selected(results: dict) -> tuple[dict, str]:
  """(test metrics of the checkpoint chosen on validation, how it was chosen)."""
  if "best" in results:
    b = results["best"]
    return b, f"best on {b.get('chosen_on', '?')} (step {b.get('step')})"
  return results["last"], "last"


def budget_lines(config: dict, results: dict) -> list[str]:
  """What the runs share: data, model, optimizer, steps (from one run's saved config)."""
  d, m, o, t = config["data"], config["model"], config["optim"], config["train"]
  clip = m["clip"]
  s = d.get("synthetic", {})
  return [
      f"- data: synthetic, {s.get('identities')} identities x {s.get('images_per_identity')} "
      f"images, generator seed {s.get('seed')}, rendered at {s.get('image_size')}; "
      f"augment={d.get('augment')}",
      f"- model: CLIP from scratch, embed {clip['embed_dim']}, image {clip['image_size']} patch "
      f"{clip['patch_size']}, vision {clip['vision_layers']}x{clip['vision_width']}, text "
      f"{clip['text_layers']}x{clip['text_width']}, context {clip['context_length']}, "
      f"cross-modal depth {m.get('cmt_depth')}, {clip['dtype']}",
      f"- optimizer: {o['name']} lr {o['lr']}, eps {o['eps']}, wd {o['weight_decay']}, "
      f"{o['schedule']} per {o['schedule_unit']}, warm-up {o['warmup_epochs']} epoch(s)",
      f"- training: batch {t['batch_size']}, {t['num_epochs']} epochs"
      f"{', max_steps ' + str(t['max_steps']) if t.get('max_steps') else ''} "
      f"({results['last']['step']} steps), best checkpoint chosen on {t['best_split']}",
  ]


def render(rows: dict, commands: dict, budget: str, overrides: list[str], seeds: list[int]
           ) -> str:
  """rows: method -> list of results.json dicts (one per seed)."""
  any_results = next(iter(rows.values()))[0]
  lines = ["# Results on the synthetic benchmark", "",
           "Written by `python -m benchmarks.results_table "
           f"--methods={','.join(rows)} --seeds={','.join(map(str, seeds))} --budget={budget}"
           + "".join(f" --set={o}" for o in overrides) + "`. Text-to-image retrieval on the "
           "synthetic test split; mean ± sample std (ddof 1) over seeds "
           f"{', '.join(map(str, seeds))}, in percent.", "", "## Budget (identical for every run)",
           ""]
  lines += budget_lines(any_results["config"], any_results)
  if overrides:
    lines.append(f"- overrides: {', '.join(overrides)}")
  for title, pick in (("Checkpoint chosen on validation (the last step if a run has none)",
                       lambda r: selected(r)[0]),
                      ("Last step", lambda r: r["last"])):
    lines += ["", f"## {title}", "", "| method | " + " | ".join(METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for method, results in rows.items():
      cells = [fmt(*mean_std([pick(r)[k] for r in results])) for k in METRICS]
      lines.append(f"| {method} | " + " | ".join(cells) + " |")
  chance = any_results.get("chance")
  if chance:
    lines += ["", "Chance level: " + ", ".join(f"{k} {chance[k]:.2f}" for k in METRICS
                                               if k in chance)]
  lines += ["", "## Runs", "", "| method | seed | chosen | R1 | mAP | command |", "|---|---|---|---|---|---|"]
  for method, results in rows.items():
    for seed, r in zip(seeds, results):
      sel, how = selected(r)
      lines.append(f"| {method} | {seed} | {how} | {sel['R1']:.2f} | {sel['mAP']:.2f} | "
                   f"`{commands[method][seed]}` |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--methods", default="irra,ucfa,mum")
  p.add_argument("--seeds", default="1,2,3")
  p.add_argument("--budget", default="default", choices=sorted(BUDGETS))
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run, e.g. --set=train.num_epochs=6")
  p.add_argument("--runs", default="runs/results", help="root of the run workdirs")
  p.add_argument("--tag", default="", help="subdirectory of --runs (default: the budget, plus a "
                 "hash of the overrides)")
  p.add_argument("--output", default="docs/results.md")
  p.add_argument("--force", action="store_true", help="rerun even if results.json exists")
  p.add_argument("--dry_run", action="store_true", help="print the commands only")
  args = p.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  for m in methods:
    config_file(m)
  tag = args.tag or run_tag(args.budget, args.set)
  rows, commands = {}, {}
  for method in methods:
    rows[method], commands[method] = [], {}
    for seed in seeds:
      workdir = Path(args.runs) / tag / method / f"seed{seed}"
      cmd = run_command(method, seed, args.budget, workdir, args.set)
      commands[method][seed] = display_command(cmd)
      if args.dry_run:
        print(commands[method][seed])
        continue
      rows[method].append(run_one(cmd, REPO_ROOT / workdir if not workdir.is_absolute()
                                  else workdir, args.force))
  if args.dry_run:
    return
  text = render(rows, commands, args.budget, args.set, seeds)
  out = Path(args.output)
  out = out if out.is_absolute() else REPO_ROOT / out
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.exists() and NOTES in out.read_text():  # hand-written reading of the table survives
    text = text.rstrip("\n") + "\n\n" + out.read_text()[out.read_text().index(NOTES):]
  out.write_text(text)
  print(text)
  print(f"wrote {out}")


if __name__ == "__main__":
  os.chdir(REPO_ROOT)
  main()
