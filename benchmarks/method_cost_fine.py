"""Training-step cost of FMFA and the part-level method relative to IRRA, measured in one run.

Run: `python -m benchmarks.method_cost_fine [--size full|small] [--batch 8] [--rounds 3]
      [--steps 2] [--loss-batch 64] [--no-write]`.

1. Step time. Each method is built from its CUHK-PEDES config (configs/cuhk.py for IRRA,
   configs/methods/{fmfa,parts}.py:cuhk: vocab 49408, 4-layer cross-modal transformer, 11003
   classes, the method's Adam groups) with the model shapes of --size ('full' = CLIP ViT-B/16 at
   384x128 + the 12-layer text tower, float32), timed as the engine's jitted train step
   (make_train_step). Every method runs in its own process (a full-size train state and its
   compiled step take ~8 GB: three do not fit this shared machine together); `rounds` rounds each
   start one process per method in turn (interleaved, so load changes hit all methods alike), and
   each process times `steps` steps after a warm-up step. The persistent compilation cache makes
   every process after a method's first load the executable. Reported: median wall and CPU (all
   threads of the worker) seconds per step, the ratios to IRRA, and each worker's peak RSS.
   The part method runs with its gate open (start_epoch 0); the gate is a traced multiplier, so
   the step costs the same before and after the start epoch.
2. Batch-coupled losses at --loss-batch (64, the reference batch): `loss` alone (forward +
   gradient w.r.t. the per-example outputs, random outputs of the full-size shapes), per method:
   median time and the XLA scratch (`memory_analysis().temp_size_in_bytes`). This is where
   A-SDM's B x B matrix, EFA's [B, B, L, N] matching (chunk 16) and the part losses' [B, B, K]
   similarities live; it grows with B^2 while the towers grow with B.
Batches are random: N(0,1) images, 20-50 BPE-id captions masked with IRRA's MLM rule, identities
in pairs. Writes the '## Method cost (fine-grained)' section of docs/performance.md (only that).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Method cost (fine-grained)"
METHODS = ("irra", "fmfa", "parts")


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
  """The method's CUHK-PEDES config with the model shapes of `size` and the benchmark batch."""
  # pylint: disable=import-outside-toplevel
  from configs import cuhk
  from configs.methods import fmfa, parts
  c = {"irra": cuhk.get_config, "fmfa": lambda: fmfa.get_config("cuhk"),
       "parts": lambda: parts.get_config("cuhk")}[name]()
  cfg = clip_config(size)
  c.model.clip.update({k: v for k, v in cfg.to_dict().items() if k in c.model.clip})
  c.model.clip.image_size = tuple(cfg.image_size)
  c.train.batch_size = batch
  if name == "parts":
    c.parts.start_epoch = 0
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
              caption_ids=ids, mlm_ids=mlm_ids.astype(np.int32), mlm_labels=labels.astype(np.int32),
              pids=(np.arange(batch) // 2).astype(np.int32),
              image_ids=np.arange(batch, dtype=np.int32))


def _build(name: str, size: str, batch: int, num_classes: int):
  # pylint: disable=import-outside-toplevel
  from tipr_jax.methods import build_method
  c = method_config(name, size, batch)
  return c, build_method(c, clip_config=clip_config(size), num_classes=num_classes,
                         steps_per_epoch=100)


def build_step(name: str, size: str, batch: int, num_classes: int):
  """(jitted step, train state, batch on device, param count) for one method."""
  import jax  # pylint: disable=import-outside-toplevel
  from tipr_jax.training import optimizer  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from tipr_jax.training.train_step import create_train_state, make_train_step
  c, method = _build(name, size, batch, num_classes)
  params = jax.jit(method.init)(jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  tx, schedule = optimizer.make_optimizer(params, c.optim, steps_per_epoch=100, num_epochs=60)
  state = jax.jit(lambda p: create_train_state(p, tx, jax.random.key(1)))(params)
  del params
  step = jax.jit(make_train_step(method, tx, c, schedule), donate_argnums=(0,))
  data = jax.device_put(make_batch(clip_config(size), batch))
  return step, state, data, n_params


def _timed(fn):
  import jax  # pylint: disable=import-outside-toplevel
  w0, c0 = time.perf_counter(), time.process_time()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - w0, time.process_time() - c0


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


def _use_cache(cache_dir: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def step_worker(name: str, size: str, batch: int, steps: int, cache_dir: str) -> dict:
  """One method in this process: build, compile (or load from the persistent cache), one warm-up
  step, then `steps` timed steps (wall and CPU seconds of this process)."""
  _use_cache(cache_dir)
  num_classes = 11003 if size == "full" else 1000
  w0 = time.perf_counter()
  step, state, data, n_params = build_step(name, size, batch, num_classes)
  (state, metrics), _, _ = _timed(lambda: step(state, data))
  first = time.perf_counter() - w0
  wall, cpu = [], []
  for _ in range(steps):
    (state, metrics), w, c = _timed(lambda state=state: step(state, data))
    wall.append(w)
    cpu.append(c)
  return dict(method=name, wall=wall, cpu=cpu, first_s=first, n_params=n_params,
              loss=float(metrics["loss"]), peak_rss_mib=_peak_rss_mib())


def _run_worker(args: list[str]) -> dict:
  import sys  # pylint: disable=import-outside-toplevel
  cmd = [sys.executable, "-m", "benchmarks.method_cost_fine", *args]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"worker {args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_steps(size: str, batch: int, rounds: int, steps: int, methods=METHODS) -> dict:
  """`rounds` x (one subprocess per method, `steps` timed steps each), methods interleaved.

  One method per process keeps the peak memory to one model's (a full-size train state with its
  compiled step takes ~8 GB; three do not fit this shared 23 GB machine together); the
  persistent compilation cache makes every process after a method's first load the executable.
  """
  import tempfile  # pylint: disable=import-outside-toplevel
  runs = {n: dict(wall=[], cpu=[], first_s=[], n_params=0, peak_rss_mib=0.0) for n in methods}
  with tempfile.TemporaryDirectory(prefix="method_cost_fine_cache_") as cache:
    for r in range(rounds):
      for name in methods:
        res = _run_worker(["--worker", name, "--size", size, "--batch", str(batch),
                           "--steps", str(steps), "--cache_dir", cache])
        run = runs[name]
        run["wall"] += res["wall"]
        run["cpu"] += res["cpu"]
        run["first_s"].append(res["first_s"])
        run["n_params"] = res["n_params"]
        run["peak_rss_mib"] = max(run["peak_rss_mib"], res["peak_rss_mib"])
        print(f"round {r + 1}/{rounds} {name}: first step {res['first_s']:.1f} s, steps "
              + " ".join(f"{t:.2f}" for t in res["wall"]) + " s wall, "
              + " ".join(f"{t:.2f}" for t in res["cpu"])
              + f" s CPU, peak RSS {res['peak_rss_mib']:.0f} MiB, loss {res['loss']:.3f}",
              flush=True)
  out = {}
  for name, run in runs.items():
    out[name] = dict(n_params=run["n_params"], compile_s=run["first_s"][0],
                     peak_rss_mib=run["peak_rss_mib"], wall=statistics.median(run["wall"]),
                     cpu=statistics.median(run["cpu"]))
  for name in out:
    out[name]["wall_ratio"] = out[name]["wall"] / out["irra"]["wall"]
    out[name]["cpu_ratio"] = out[name]["cpu"] / out["irra"]["cpu"]
  return out


def measure_losses(size: str, batch: int, repeats: int = 3, methods=METHODS) -> dict:
  """fwd + grad of `loss` w.r.t. random per-example outputs of the method's shapes at `batch`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  num_classes = 11003 if size == "full" else 1000
  out = {}
  for name in methods:
    _, method = _build(name, size, batch, num_classes)
    data = {k: jnp.asarray(v) for k, v in make_batch(clip_config(size), batch).items()}
    params = jax.eval_shape(method.init, jax.random.key(0))
    shapes = jax.eval_shape(method.forward, params, data, jax.random.key(0))
    keys = jax.random.split(jax.random.key(2), len(shapes))
    outputs = {k: jax.random.normal(key, s.shape, s.dtype)
               for key, (k, s) in zip(keys, sorted(shapes.items()))}
    for k in ("mlm_count", "mlm_nll", "mlm_correct"):  # non-negative counts / sums
      if k in outputs:
        outputs[k] = jnp.abs(outputs[k]) + 1.0
    if "part_weights" in outputs:
      outputs["part_weights"] = jax.nn.softmax(outputs["part_weights"], axis=-1)
    step = jnp.int32(10_000)

    def objective(o, method=method, data=data, step=step):
      return method.loss(o, data, step)[0]

    fn = jax.jit(jax.value_and_grad(objective))
    compiled = fn.lower(outputs).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    _timed(lambda: fn(outputs))
    walls, cpus = [], []
    for _ in range(repeats):
      _, wall, cpu = _timed(lambda: fn(outputs))
      walls.append(wall)
      cpus.append(cpu)
    out[name] = dict(wall=statistics.median(walls), cpu=statistics.median(cpus),
                     temp_mib=temp / 2 ** 20)
    print(f"loss {name} @ {batch}: {1e3 * out[name]['wall']:.1f} ms wall, "
          f"{1e3 * out[name]['cpu']:.1f} ms CPU, "
          f"XLA temp {out[name]['temp_mib']:.0f} MiB", flush=True)
  return out


def _uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "n/a"


def render(steps: dict, losses_small: dict, losses_big: dict, args, load_before: str,
           load_after: str) -> str:
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  b, lb = args.batch, args.loss_batch
  model = ("CLIP ViT-B/16, 384x128, 12-layer text tower" if args.size == "full"
           else "a small CLIP")
  lines = [
      SECTION, "",
      f"`python -m benchmarks.method_cost_fine --size {args.size} --batch {b} --rounds "
      f"{args.rounds} --steps {args.steps} --loss-batch {lb}`: one jitted training step "
      f"(forward, loss, backward, Adam) of each method at {model}, float32, batch {b}, on "
      f"{jax.device_count()} {dev.platform.upper()} device(s); configs `configs/cuhk.py` (IRRA) "
      f"and "
      f"`configs/methods/{{fmfa,parts}}.py:cuhk` (FMFA: A-SDM code mode + EFA code margins, row "
      f"normalisation, chunk 16, masked caption for every term = one text pass; parts: 8 queries, "
      f"2-layer shared decoder over 193 image / 77 text tokens, part SDM with predicted weights + "
      f"commonality margin ranking, gate open). {args.rounds} rounds; in each, every method runs "
      f"in its own process (compiled once, then loaded from a persistent compilation cache) and "
      f"times {args.steps} steps after a warm-up step; median over the {args.rounds * args.steps} "
      f"timed steps of wall and CPU seconds (all threads of the worker process).", "",
      "| method | params (M) | step wall (s) | step CPU (s) | ratio to IRRA (wall) | "
      "ratio to IRRA (CPU) | peak RSS (GiB) |",
      "|---|---|---|---|---|---|---|"]
  for name, r in steps.items():
    lines.append(f"| {name} | {r['n_params'] / 1e6:.1f} | {r['wall']:.2f} | {r['cpu']:.2f} | "
                 f"{r['wall_ratio']:.2f}x | {r['cpu_ratio']:.2f}x | "
                 f"{r['peak_rss_mib'] / 1024:.1f} |")
  lines += [
      "", f"Batch-coupled losses alone (`method.loss` forward + gradient w.r.t. the per-example "
      f"outputs, full-size output shapes, random values): these terms grow with B^2, the rest of "
      f"the step with B.", "",
      f"| method | loss @ {b}: CPU (ms) | loss @ {lb}: wall (ms) | loss @ {lb}: CPU (ms) | "
      f"XLA scratch @ {lb} (MiB) |",
      "|---|---|---|---|---|"]
  for name in losses_big:
    s, g = losses_small[name], losses_big[name]
    lines.append(f"| {name} | {1e3 * s['cpu']:.1f} | {1e3 * g['wall']:.1f} | "
                 f"{1e3 * g['cpu']:.1f} | "
                 f"{g['temp_mib']:.0f} |")
  irra64 = steps["irra"]["cpu"] * lb / b
  extra = {n: losses_big[n]["cpu"] - losses_big["irra"]["cpu"] for n in losses_big}
  lines += [
      "", f"At batch {lb}, scaling IRRA's step linearly from batch {b} ({irra64:.1f} s CPU, an "
      f"over-estimate: the Adam update does not grow with B), the extra loss cost is "
      + ", ".join(f"{n} {extra[n]:+.2f} s ({100 * extra[n] / irra64:+.1f} %)" for n in extra
                  if n != "irra")
      + f" of the step. EFA's peak memory at batch {lb} is in the fmfa row's XLA scratch (the "
      f"whole FMFA loss: A-SDM + EFA at chunk 16 + ID + MLM); \"EFA memory\" above breaks "
      f"`efa_loss` alone down by chunk size, with peak RSS.",
      "", f"Target: at most 1.3x IRRA. Machine (shared 2-core CPU) `uptime` before: "
      f"`{load_before}`; after: `{load_after}`. Ratios, not absolute times, are the figure: the "
      f"methods ran interleaved under the same load.", ""]
  return "\n".join(lines)


def write_section(text: str, path: Path = REPO_ROOT / "docs" / "performance.md") -> None:
  """Replaces (or appends) this benchmark's section; re-reads the file right before writing."""
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
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--loss-batch", type=int, default=64)
  p.add_argument("--no-write", action="store_true")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a method name, or 'losses'
  p.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  os.chdir(REPO_ROOT)
  if args.worker == "losses":
    print(json.dumps(dict(small=measure_losses(args.size, args.batch),
                          big=measure_losses(args.size, args.loss_batch))))
    return
  if args.worker:
    print(json.dumps(step_worker(args.worker, args.size, args.batch, args.steps, args.cache_dir)))
    return
  before = _uptime()
  steps = measure_steps(args.size, args.batch, args.rounds, args.steps)
  losses = _run_worker(["--worker", "losses", "--size", args.size, "--batch", str(args.batch),
                        "--loss-batch", str(args.loss_batch)])
  after = _uptime()
  text = render(steps, losses["small"], losses["big"], args, before, after)
  print(text)
  if not args.no_write:
    write_section(text)


if __name__ == "__main__":
  main()
