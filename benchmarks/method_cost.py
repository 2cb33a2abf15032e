"""Training-step cost of every seed method relative to the IRRA baseline, measured in one run.

Run: `python -m benchmarks.method_cost [--size full|small] [--batch 8] [--rounds 2] [--steps 3]
[--loss-batch 64] [--methods irra,ucfa,mum,fmfa,parts] [--no-write]`.

1. Step time. Each method is built from its CUHK-PEDES config (`configs/methods/<m>.py:cuhk`:
   vocab 49408, 4-layer cross-modal transformer, 11003 classes, the method's Adam groups) with the
   model shapes of --size ('full' = CLIP ViT-B/16 at 384x128 + the 12-layer text tower, float32)
   and timed as the engine's jitted train step (`make_train_step`). Every method runs in its own
   process (a full-size train state with its compiled step takes ~8 GB: several do not fit the
   machine together); each of `rounds` rounds starts one process per method in turn (interleaved,
   so load changes on a shared machine hit all methods alike), and each process times `steps`
   steps after a warm-up step. A persistent compilation cache makes every process after a
   method's first load the executable instead of compiling it. Reported: median wall and CPU
   seconds per step (CPU = all threads of the worker), their ratios to IRRA's, peak RSS.
   The part method runs with its gate open (start_epoch 0; the gate is a traced multiplier, so
   the step costs the same before and after the start epoch).
2. Batch-coupled losses at --loss-batch (64, the reference batch): `method.loss` alone (forward
   + gradient w.r.t. random per-example outputs of the full-size shapes): median time and XLA
   scratch (`memory_analysis().temp_size_in_bytes`). This is where the B x B similarity matrices,
   EFA's [B, B, L, N] matching (chunked) and the part losses' [B, B, K] similarities live: they
   grow with B^2 while the towers grow with B.
Batches are random (benchmarks.common.masked_caption_batch), identities in pairs (so MUM's
identity-level variance is non-zero). Writes the '## Method cost' section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common

SECTION = "## Method cost"
METHODS = ("irra", "ucfa", "mum", "fmfa", "parts")


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
  # pylint: disable-next=import-outside-toplevel
  from configs.methods import fmfa, irra, mum, parts, ucfa
  module = {"irra": irra, "ucfa": ucfa, "mum": mum, "fmfa": fmfa, "parts": parts}[name]
  c = module.get_config("cuhk")
  cfg = clip_config(size)
  c.model.clip.update({k: v for k, v in cfg.to_dict().items() if k in c.model.clip})
  c.model.clip.image_size = tuple(cfg.image_size)
  c.train.batch_size = batch
  if name == "parts":
    c.parts.start_epoch = 0
  return c


def _num_classes(size: str) -> int:
  return 11003 if size == "full" else 1000


def _batch(size: str, batch: int) -> dict:
  return common.masked_caption_batch(clip_config(size), batch, pids=np.arange(batch) // 2)


def _build(name: str, size: str, batch: int):
  from tipr_jax.methods import build_method  # pylint: disable=import-outside-toplevel
  c = method_config(name, size, batch)
  return c, build_method(c, clip_config=clip_config(size), num_classes=_num_classes(size),
                         steps_per_epoch=100)


def _timed(fn):
  """(fn(), wall s, CPU s of this process), waiting for JAX results."""
  import jax  # pylint: disable=import-outside-toplevel
  w0, c0 = time.perf_counter(), time.process_time()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - w0, time.process_time() - c0


def step_worker(name: str, size: str, batch: int, steps: int, cache_dir: str) -> dict:
  """One method in this process: build, compile (or load from the persistent cache), one warm-up
  step, then `steps` timed steps."""
  # pylint: disable=import-outside-toplevel
  import jax
  from tipr_jax.training import optimizer
  from tipr_jax.training.train_step import create_train_state, make_train_step
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  w0 = time.perf_counter()
  c, method = _build(name, size, batch)
  params = jax.jit(method.init)(jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  tx, schedule = optimizer.make_optimizer(params, c.optim, steps_per_epoch=100, num_epochs=60)
  state = jax.jit(lambda p: create_train_state(p, tx, jax.random.key(1)))(params)
  del params
  step = jax.jit(make_train_step(method, tx, c, schedule), donate_argnums=(0,))
  data = jax.device_put(_batch(size, batch))
  (state, metrics), _, _ = _timed(lambda: step(state, data))
  first = time.perf_counter() - w0
  wall, cpu = [], []
  for _ in range(steps):
    (state, metrics), w, t = _timed(lambda state=state: step(state, data))
    wall.append(w)
    cpu.append(t)
  return dict(method=name, wall=wall, cpu=cpu, first_s=first, n_params=n_params,
              loss=float(metrics["loss"]), peak_rss_mib=common.status_kb("VmHWM") / 1024)


def loss_worker(size: str, batch: int, methods: tuple[str, ...], repeats: int = 3) -> dict:
  """fwd + grad of each method's `loss` w.r.t. random per-example outputs at `batch`."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  out = {}
  for name in methods:
    _, method = _build(name, size, batch)
    data = {k: jnp.asarray(v) for k, v in _batch(size, batch).items()}
    data["example_index"] = jnp.arange(batch, dtype=jnp.int32)  # as the train step adds it
    params = jax.eval_shape(method.init, jax.random.key(0))
    shapes = jax.eval_shape(method.forward, params, data, jax.random.key(0))
    keys = jax.random.split(jax.random.key(2), len(shapes))
    outputs = {k: jax.random.normal(key, s.shape, s.dtype) if jnp.issubdtype(s.dtype, jnp.floating)
               else jnp.ones(s.shape, s.dtype)
               for key, (k, s) in zip(keys, sorted(shapes.items()))}
    for k in outputs:  # non-negative per-example counts and sums (MLM, UAMLR, ...)
      if k.endswith(("_count", "_nll", "_correct")):
        outputs[k] = jnp.abs(outputs[k]) + 1.0
    if "part_weights" in outputs:
      outputs["part_weights"] = jax.nn.softmax(outputs["part_weights"], axis=-1)

    def objective(o, method=method, data=data):
      return method.loss(o, data, jnp.int32(10_000))[0]

    fn = jax.jit(jax.value_and_grad(objective))
    temp = fn.lower(outputs).compile().memory_analysis().temp_size_in_bytes
    _timed(lambda fn=fn: fn(outputs))
    walls, cpus = [], []
    for _ in range(repeats):
      _, w, t = _timed(lambda fn=fn: fn(outputs))
      walls.append(w)
      cpus.append(t)
    out[name] = dict(wall=statistics.median(walls), cpu=statistics.median(cpus),
                     temp_mib=temp / 2 ** 20)
    print(f"loss {name} @ {batch}: {1e3 * out[name]['wall']:.1f} ms wall, "
          f"{1e3 * out[name]['cpu']:.1f} ms CPU, XLA temp {out[name]['temp_mib']:.0f} MiB",
          file=sys.stderr, flush=True)
  return out


def _run_worker(args: list[str]) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.method_cost", *args]
  proc = subprocess.run(cmd, cwd=common.REPO_ROOT, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"worker {args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_steps(size: str, batch: int, rounds: int, steps: int, methods: tuple[str, ...]
                  ) -> dict:
  """`rounds` x (one subprocess per method, `steps` timed steps each), methods interleaved."""
  runs = {n: dict(wall=[], cpu=[], first_s=[], n_params=0, peak_rss_mib=0.0) for n in methods}
  with tempfile.TemporaryDirectory(prefix="method_cost_cache_") as cache:
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
  out = {name: dict(n_params=run["n_params"], compile_s=run["first_s"][0],
                    peak_rss_mib=run["peak_rss_mib"], wall=statistics.median(run["wall"]),
                    cpu=statistics.median(run["cpu"]), cpu_all=run["cpu"])
         for name, run in runs.items()}
  for r in out.values():
    r["wall_ratio"] = r["wall"] / out["irra"]["wall"]
    r["cpu_ratio"] = r["cpu"] / out["irra"]["cpu"]
  return out


def render(steps: dict, losses_small: dict, losses_big: dict, args, load_before: str,
           load_after: str) -> str:
  b, lb = args.batch, args.loss_batch
  model = ("CLIP ViT-B/16, 384x128, 12-layer text tower" if args.size == "full"
           else "a small CLIP")
  lines = [
      SECTION, "",
      f"`python -m benchmarks.method_cost --size {args.size} --batch {b} --rounds {args.rounds} "
      f"--steps {args.steps} --loss-batch {lb}`: one jitted training step (forward, loss, "
      f"backward, Adam) of each method at {model}, float32, batch {b}, on 1 CPU device; configs "
      f"`configs/methods/<m>.py:cuhk` (UCFA: K = 3, duplicated-block head, UAMLR over the K "
      f"sampled image token sequences; MUM: one augmentation sample, circle loss, global recovery "
      f"with a forward-only clean-caption pass; FMFA: A-SDM code mode + EFA with the code's "
      f"margins and row normalisation, chunk 16; parts: 8 queries, 2-layer shared decoder, part "
      f"SDM with predicted weights + commonality margin ranking, gate open). {args.rounds} "
      f"rounds; in each, every method runs in its own process (compiled once, then loaded from a "
      f"persistent compilation cache) and times {args.steps} steps after a warm-up step; median "
      f"over the {args.rounds * args.steps} timed steps of wall and CPU seconds (all threads of "
      f"the worker process).", "",
      "| method | params (M) | step wall (s) | step CPU (s) | ratio to IRRA (wall) | "
      "ratio to IRRA (CPU) | peak RSS (GiB) |",
      "|---|---|---|---|---|---|---|"]
  for name, r in steps.items():
    lines.append(f"| {name} | {r['n_params'] / 1e6:.1f} | {r['wall']:.2f} | {r['cpu']:.2f} | "
                 f"{r['wall_ratio']:.2f}x | {r['cpu_ratio']:.2f}x | "
                 f"{r['peak_rss_mib'] / 1024:.1f} |")
  lines += [
      "", "Batch-coupled losses alone (`method.loss` forward + gradient w.r.t. the per-example "
      "outputs, full-size output shapes, random values): these terms grow with B^2, the rest of "
      "the step with B.", "",
      f"| method | loss @ {b}: CPU (ms) | loss @ {lb}: wall (ms) | loss @ {lb}: CPU (ms) | "
      f"XLA scratch @ {lb} (MiB) |",
      "|---|---|---|---|---|"]
  for name in losses_big:
    s, g = losses_small[name], losses_big[name]
    lines.append(f"| {name} | {1e3 * s['cpu']:.1f} | {1e3 * g['wall']:.1f} | "
                 f"{1e3 * g['cpu']:.1f} | {g['temp_mib']:.0f} |")
  irra64 = steps["irra"]["cpu"] * lb / b
  extra = {n: losses_big[n]["cpu"] - losses_big["irra"]["cpu"] for n in losses_big if n != "irra"}
  lines += [
      "", f"At batch {lb}, scaling IRRA's step linearly from batch {b} ({irra64:.1f} s CPU, an "
      f"over-estimate: the Adam update does not grow with B), the extra loss cost is "
      + ", ".join(f"{n} {extra[n]:+.2f} s ({100 * extra[n] / irra64:+.1f} %)" for n in extra)
      + f" of the step. EFA's peak memory at batch {lb} is in the fmfa row's XLA scratch (the "
      f"whole FMFA loss: A-SDM + EFA at chunk 16 + ID + MLM); \"EFA memory\" above breaks "
      f"`efa_loss` alone down by chunk size, with peak RSS.",
      "", f"Target: at most 1.3x IRRA. Machine (2-core CPU) `uptime` before: `{load_before}`; "
      f"after: `{load_after}`. Ratios, not absolute times, are the figure: the methods ran "
      f"interleaved under the same load, and CPU time moves much less with other jobs on the "
      f"machine than wall time does.", ""]
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="full", choices=("full", "small"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
  p.add_argument("--loss-batch", type=int, default=64)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--no-write", action="store_true")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a method name, or 'losses'
  p.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  methods = tuple(m for m in args.methods.split(",") if m)
  if args.worker == "losses":
    print(json.dumps(dict(small=loss_worker(args.size, args.batch, methods),
                          big=loss_worker(args.size, args.loss_batch, methods))))
    return
  if args.worker:
    print(json.dumps(step_worker(args.worker, args.size, args.batch, args.steps, args.cache_dir)))
    return
  if methods[0] != "irra":
    raise SystemExit("--methods must start with irra (the ratios are relative to it)")
  before = common.uptime()
  steps = measure_steps(args.size, args.batch, args.rounds, args.steps, methods)
  losses = _run_worker(["--worker", "losses", "--size", args.size, "--batch", str(args.batch),
                        "--loss-batch", str(args.loss_batch), "--methods", args.methods])
  text = render(steps, losses["small"], losses["big"], args, before, common.uptime())
  print(text)
  if not args.no_write:
    print("wrote", common.write_section(SECTION, text))


if __name__ == "__main__":
  main()
