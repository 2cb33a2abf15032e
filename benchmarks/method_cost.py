"""Training-step cost of the probabilistic methods (UCFA, MUM) relative to IRRA, in one run.

Run: `python -m benchmarks.method_cost [--size full|small] [--batch 8] [--rounds 3] [--steps 3]
[--no-write]`.

Each method is built from its dataset config (configs/methods/<m>.py:cuhk: the real recipe, vocab
49408, 4-layer cross-modal transformer, 11003 classes) with the model size replaced by --size
('full' = CLIP ViT-B/16 at 384x128 + the 12-layer text tower, float32), and timed as the engine's
jitted train step (`make_train_step`, Adam groups of the config). Every method runs in its own
process (a full-size train state and its compiled step take ~8 GB: three do not fit the machine
together); `rounds` rounds each start one process per method in turn (interleaved, so load
changes on a shared machine hit all methods alike), and each process times `steps` steps after a
warm-up step. The persistent compilation cache makes every process after a method's first load
the executable instead of compiling it. Reported: the median step time per method (wall and process CPU
time), its ratios to IRRA's, and the peak RSS of its process.
Batches are random: N(0,1) images, 20-50 BPE-id captions masked with IRRA's MLM rule (the same
masked positions for every method; UCFA's attribute masking is a data-side choice with a similar
count), identities in pairs (so MUM's identity-level variance is non-zero).
Writes the '## Method cost (probabilistic)' section of docs/performance.md (only that section).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Method cost (probabilistic)"
METHODS = ("irra", "ucfa", "mum")


def clip_config(size: str):
  """CLIP shapes: 'full' = ViT-B/16 @ 384x128 (the reference); 'small' for development."""
  from tipr_jax.models.clip import CLIPConfig  # pylint: disable=import-outside-toplevel
  if size == "full":
    return CLIPConfig.vit_b16()
  if size == "small":
    return CLIPConfig(embed_dim=128, image_size=(64, 32), patch_size=16, stride_size=16,
                      vision_width=128, vision_layers=2, vision_heads=2, context_length=77,
                      vocab_size=4096, text_width=128, text_layers=2, text_heads=2)
  raise ValueError(f"--size must be 'full' or 'small', got {size!r}")


def method_config(name: str, size: str, batch: int):
  """configs/methods/<name>.py:cuhk with the model shapes of `size` and the benchmark batch."""
  from configs.methods import irra, mum, ucfa  # pylint: disable=import-outside-toplevel
  module = {"irra": irra, "ucfa": ucfa, "mum": mum}[name]
  c = module.get_config("cuhk")
  cfg = clip_config(size)
  c.model.clip.update({k: v for k, v in cfg.to_dict().items() if k in c.model.clip})
  c.model.clip.image_size = tuple(cfg.image_size)
  c.train.batch_size = batch
  return c


def make_batch(cfg, batch: int, seed: int = 0) -> dict:
  """Random numpy batch with IRRA's MLM masking; pids in pairs."""
  from tipr_jax.data.masking import mlm_mask_batch  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  v, ctx = cfg.vocab_size, cfg.context_length
  ids = np.zeros((batch, ctx), np.int32)
  for i in range(batch):
    n = int(rng.integers(20, 51))
    ids[i, 0] = v - 2
    ids[i, 1:n] = rng.integers(1, v - 3, n - 1)
    ids[i, n] = v - 1
  mlm_ids, labels = mlm_mask_batch(ids, rng, mask_id=v - 3)
  h, w = cfg.image_size
  return dict(images=rng.standard_normal((batch, h, w, 3)).astype(np.float32),
              caption_ids=ids, mlm_ids=mlm_ids, mlm_labels=labels,
              pids=(np.arange(batch) // 2).astype(np.int32),
              image_ids=np.arange(batch, dtype=np.int32))


def build_step(name: str, size: str, batch: int, num_classes: int):
  """(jitted step, state, batch on device, param count) for one method."""
  import jax  # pylint: disable=import-outside-toplevel
  from tipr_jax.methods import build_method  # pylint: disable=import-outside-toplevel
  from tipr_jax.training import optimizer  # pylint: disable=import-outside-toplevel
  from tipr_jax.training.train_step import create_train_state, make_train_step  # pylint: disable=import-outside-toplevel
  c = method_config(name, size, batch)
  cfg = clip_config(size)
  method = build_method(c, clip_config=cfg, num_classes=num_classes)
  params = jax.jit(method.init)(jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  tx, schedule = optimizer.make_optimizer(params, c.optim, steps_per_epoch=100, num_epochs=60)
  state = jax.jit(lambda p: create_train_state(p, tx, jax.random.key(1)))(params)
  del params
  step = jax.jit(make_train_step(method, tx, c, schedule), donate_argnums=(0,))
  data = jax.device_put(make_batch(cfg, batch))
  return step, state, data, n_params


def _peak_rss_mib() -> float:
  """Peak resident set size of this process (VmHWM), MiB; nan where /proc is unavailable."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return float("nan")


def worker(name: str, size: str, batch: int, steps: int, cache_dir: str) -> dict:
  """One method in this process: build, compile (or load from the persistent cache), one warm-up
  step, then `steps` timed steps. Returns a JSON-able dict."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  num_classes = 11003 if size == "full" else 1000
  t0 = time.perf_counter()
  step, state, data, n_params = build_step(name, size, batch, num_classes)
  state, metrics = step(state, data)  # compile (or cache load) + first step
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t0
  times, cpu = [], []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return dict(method=name, times=times, cpu=cpu, first_s=first, n_params=n_params,
              loss=float(metrics["loss"]), peak_rss_mib=_peak_rss_mib())


def measure(size: str, batch: int, rounds: int, steps: int, methods=METHODS) -> dict:
  """`rounds` x (one subprocess per method, `steps` timed steps each), methods interleaved.

  One method per process keeps the peak memory to one model's (three full-size train states and
  their compiled steps do not fit a 23 GB machine together); the persistent compilation cache
  makes every process after the first of a method load its executable instead of compiling.
  """
  import tempfile  # pylint: disable=import-outside-toplevel
  runs = {name: dict(times=[], cpu=[], first_s=[], n_params=0, peak_rss_mib=0.0)
          for name in methods}
  with tempfile.TemporaryDirectory(prefix="method_cost_cache_") as cache:
    for r in range(rounds):
      for name in methods:
        cmd = [sys.executable, "-m", "benchmarks.method_cost", "--worker", name, "--size", size,
               "--batch", str(batch), "--steps", str(steps), "--cache_dir", cache]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
          raise RuntimeError(f"worker {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        run = runs[name]
        run["times"] += res["times"]
        run["cpu"] += res["cpu"]
        run["first_s"].append(res["first_s"])
        run["n_params"] = res["n_params"]
        run["peak_rss_mib"] = max(run["peak_rss_mib"], res["peak_rss_mib"])
        print(f"round {r + 1}/{rounds} {name}: first step {res['first_s']:.1f} s, steps "
              + " ".join(f"{t:.2f}" for t in res["times"]) + " s (CPU "
              + " ".join(f"{t:.2f}" for t in res["cpu"])
              + f" s), peak RSS {res['peak_rss_mib']:.0f} MiB, loss {res['loss']:.3f}", flush=True)
  base = statistics.median(runs["irra"]["times"])
  base_cpu = statistics.median(runs["irra"]["cpu"])
  return {name: dict(median_s=statistics.median(run["times"]), min_s=min(run["times"]),
                     median_cpu_s=statistics.median(run["cpu"]), times=run["times"],
                     cpu=run["cpu"], n_params=run["n_params"], compile_s=run["first_s"][0],
                     peak_rss_mib=run["peak_rss_mib"],
                     ratio=statistics.median(run["times"]) / base,
                     cpu_ratio=statistics.median(run["cpu"]) / base_cpu)
          for name, run in runs.items()}


def _uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "n/a"


def render(results: dict, size: str, batch: int, rounds: int, steps: int, load_before: str,
           load_after: str) -> str:
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  lines = [
      SECTION, "",
      f"`python -m benchmarks.method_cost --size {size} --batch {batch} --rounds {rounds} "
      f"--steps {steps}`: one "
      f"jitted training step (forward, loss, backward, Adam) of each method at "
      f"{'CLIP ViT-B/16, 384x128, 12-layer text tower' if size == 'full' else 'a small CLIP'}, "
      f"float32, batch {batch}, on {jax.device_count()} {dev.platform.upper()} device(s); "
      f"configs `configs/methods/<m>.py:cuhk` (UCFA: K = 3, duplicated-block head, UAMLR over "
      f"the K sampled image token sequences; MUM: one augmentation sample, circle loss, global "
      f"recovery with a forward-only clean-caption pass). {rounds} rounds; in each, every method "
      f"runs in its own process (compiled once, then loaded from a persistent compilation cache) "
      f"and times {steps} steps after a warm-up step; median over the {rounds * steps} timed "
      f"steps.", "",
      "| method | params (M) | median step, wall (s) | min wall (s) | ratio to IRRA, wall | "
      "median step, CPU time (s) | ratio to IRRA, CPU time | peak RSS (GiB) |",
      "|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    lines.append(f"| {name} | {r['n_params'] / 1e6:.1f} | {r['median_s']:.2f} | "
                 f"{r['min_s']:.2f} | {r['ratio']:.2f}x | {r['median_cpu_s']:.2f} | "
                 f"{r['cpu_ratio']:.2f}x | {r['peak_rss_mib'] / 1024:.1f} |")
  lines += ["", f"Target: at most 1.3x IRRA. Machine load (shared 2-core CPU), `uptime` before: "
            f"`{load_before}`; after: `{load_after}`. The ratios, not the absolute times, are the "
            f"figure: the methods ran interleaved, so load changes hit all of them. CPU time "
            f"(all threads of the process, `time.process_time`) is the work done and moves much "
            f"less with the other jobs on the machine than wall time does.", ""]
  return "\n".join(lines)


def write_section(text: str, path: Path = REPO_ROOT / "docs" / "performance.md") -> None:
  """Replaces (or appends) this benchmark's section; the rest of the file is kept as it is now."""
  old = path.read_text() if path.exists() else "# Performance\n"
  lines = old.splitlines(keepends=True)
  start = next((i for i, l in enumerate(lines) if l.rstrip() == SECTION), None)
  if start is None:
    new = old.rstrip("\n") + "\n\n" + text
  else:
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = "".join(lines[:start]) + text + ("\n" if end < len(lines) else "") + "".join(lines[end:])
  path.write_text(new)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="full", choices=("full", "small"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--no-write", action="store_true")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  p.add_argument("--cache_dir", help=argparse.SUPPRESS)
  args = p.parse_args()
  os.chdir(REPO_ROOT)
  if args.worker:
    print(json.dumps(worker(args.worker, args.size, args.batch, args.steps, args.cache_dir)))
    return
  methods = tuple(m for m in args.methods.split(",") if m)
  if methods[0] != "irra":
    raise SystemExit("--methods must start with irra (the ratios are relative to it)")
  before = _uptime()
  results = measure(args.size, args.batch, args.rounds, args.steps, methods)
  after = _uptime()
  text = render(results, args.size, args.batch, args.rounds, args.steps, before, after)
  print(text)
  if not args.no_write:
    write_section(text)


if __name__ == "__main__":
  main()
