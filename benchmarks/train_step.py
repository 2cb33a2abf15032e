"""IRRA training-step, scaling and evaluation-encoding throughput: tipr_jax vs a PyTorch reference.

Run: `python -m benchmarks.train_step [--parts train,flags,scaling,encode] [--size full|small]
[--no-write]`. Every measurement runs in its own subprocess (fresh peak-RSS counter, its own device
count and XLA_FLAGS), one after the other; each prints one JSON line, progress goes to
/tmp/tipr_bench_train_step.log. Writes the '## Training step (IRRA)', '## Scaling' and
'## Evaluation encoding' sections of docs/performance.md.

- train: the full IRRA step (tipr_jax.methods.irra + the engine's jitted train step with the Adam
  groups of configs/base.py) at float32 and bfloat16 compute, against `benchmarks.irra_torch` (the
  reference model, losses and Adam re-implemented in PyTorch: two text passes, MLM head on all 77
  positions) at float32 and under bfloat16 autocast. Each process first times a jnp 4096^3 float32
  matmul (median of 5): the peak that "% of peak" refers to, and a load gauge. FLOPs are analytic
  (benchmarks.irra_flops). Also: a thunk-level profile of one float32 step (tower, direction, op
  kind), and experimental step variants (`--variants no_guard`: without the finite-loss guard).
- flags: XLA flags and bf16 tried on a 2-layer ViT-B/16 tower (forward + backward).
- scaling: one training step of a small model on 1 device and on 8 CPU devices
  (`jax_num_cpu_devices=8` on this 2-core machine, i.e. overhead, not speed-up), same global batch.
- encode: `tipr_jax.eval.evaluate.make_encoder` with `method.encode_image` / `encode_text`, batch 64,
  against the PyTorch model's encoders under `torch.no_grad()`.
Batches are random: N(0,1) images, captions of 20-50 BPE ids masked with the reference's MLM rule
(tipr_jax.data.masking.mlm_mask_batch; no caption above the 16-position MLM cap).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Training step (IRRA)", "## Scaling", "## Evaluation encoding")
NUM_CLASSES = {"full": 11003, "small": 1000}
CMT_DEPTH = {"full": 4, "small": 2}
LOG = "/tmp/tipr_bench_train_step.log"
# (compute dtype, XLA_FLAGS) tried on the ViT tower with `--parts train,flags`.
FLAG_EXPERIMENTS = (
    ("float32", ""),
    ("float32", "--xla_cpu_use_onednn=true"),
    ("float32", "--xla_cpu_prefer_vector_width=512"),
    ("float32", "--xla_cpu_enable_fast_math=true"),
    ("float32", "--xla_cpu_use_xnnpack=false"),
    ("bfloat16", ""),
    ("bfloat16", "--xla_cpu_use_onednn=true"),
)


# ----------------------------------------------------------------------------------------------------
# Shared helpers (no JAX / torch import at module level: workers pick their framework)


def clip_config(size: str, dtype: str = "float32"):
  """The CLIP shapes of a benchmark size: 'full' = ViT-B/16 @384x128 + 12-layer text tower."""
  from tipr_jax.models.clip import CLIPConfig  # pylint: disable=import-outside-toplevel
  if size == "full":
    return CLIPConfig.vit_b16(dtype=dtype)
  if size == "small":
    return CLIPConfig(embed_dim=256, image_size=(128, 64), patch_size=16, stride_size=16,
                      vision_width=256, vision_layers=4, vision_heads=4, context_length=77,
                      vocab_size=8192, text_width=256, text_layers=4, text_heads=4, dtype=dtype)
  raise ValueError(f"--size must be 'full' or 'small', got {size!r}")


def make_batch(cfg, batch: int, num_classes: int, cap: int = 16, seed: int = 0) -> dict:
  """Random numpy batch (benchmarks.common.masked_caption_batch) with distinct pids in
  [0, num_classes) and at most `cap` masked positions per caption."""
  pids = np.random.default_rng(seed + 1).choice(num_classes, batch, replace=False)
  return common.masked_caption_batch(cfg, batch, pids=pids, cap=cap, seed=seed)


def _log(msg: str) -> None:
  """Progress of a worker, on stderr (the driver tees it to /tmp/tipr_bench_train_step.log)."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _median(xs: list[float]) -> float:
  return float(np.median(np.asarray(xs)))


def _matmul_gflops(matmul, n: int, reps: int) -> float:
  """Median GFLOP/s of `matmul()` (one n^3 product, run to completion), after a warm-up call."""
  matmul()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    matmul()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / _median(times) / 1e9


def jax_matmul_gflops(n: int = 4096, reps: int = 5, dtype: str = "float32") -> float:
  """Median GFLOP/s of a jitted n^3 matmul."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: a @ b)
  return _matmul_gflops(lambda: f(a, b).block_until_ready(), n, reps)


def numpy_matmul_gflops(n: int = 2048, reps: int = 5) -> float:
  """Median GFLOP/s of a numpy (OpenBLAS) n^3 float32 matmul: a load gauge that XLA flags can't move."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
  return _matmul_gflops(lambda: a @ b, n, reps)


def torch_matmul_gflops(n: int = 4096, reps: int = 5, dtype=None) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  a = torch.randn(n, n).to(dtype or torch.float32)
  b = torch.randn(n, n).to(dtype or torch.float32)
  return _matmul_gflops(lambda: a @ b, n, reps)


# ----------------------------------------------------------------------------------------------------
# JAX workers


def _jax_setup(devices: int):
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_num_cpu_devices", devices)
  return jax


def _build_jax(size: str, dtype: str, devices: int):
  """(jax, config, clip config, method, mesh)."""
  jax = _jax_setup(devices)
  from configs import base  # pylint: disable=import-outside-toplevel
  from tipr_jax.methods import build_method  # pylint: disable=import-outside-toplevel
  from tipr_jax.training import sharding  # pylint: disable=import-outside-toplevel
  c = base.irra_config()
  c.model.cmt_depth = CMT_DEPTH[size]
  cfg = clip_config(size, dtype)
  method = build_method(c, clip_config=cfg, num_classes=NUM_CLASSES[size])
  mesh = sharding.make_mesh(jax.devices()[:devices])
  return jax, c, cfg, method, mesh


def _memory(stats) -> dict:
  if stats is None:
    return {}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "peak_memory_in_bytes")
  out = {k.replace("_in_bytes", "_mb"): getattr(stats, k, 0) / 2**20 for k in keys}
  out["buffers_mb"] = (out["argument_size_mb"] + out["output_size_mb"] - out["alias_size_mb"]
                       + out["temp_size_mb"])
  return out


def jax_train_worker(size: str, dtype: str, batch: int, steps: int, devices: int,
                     breakdown: bool) -> dict:
  """Times the jitted IRRA train step; optionally its parts (towers, heads, optimizer) alone."""
  jax, c, cfg, method, mesh = _build_jax(size, dtype, devices)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from benchmarks.irra_flops import pair_flops  # pylint: disable=import-outside-toplevel
  from tipr_jax.training import optimizer, sharding  # pylint: disable=import-outside-toplevel
  from tipr_jax.training.train_step import (  # pylint: disable=import-outside-toplevel
      create_train_state, jit_train_step, make_train_step)

  peak = jax_matmul_gflops() if devices == 1 else float("nan")
  _log(f"jax_train {size} {dtype} b{batch} d{devices}: matmul {peak:.0f} GFLOP/s; init")
  rep = sharding.replicated(mesh)
  params = jax.jit(method.init, out_shardings=rep)(jax.random.key(0))
  tx, sched = optimizer.make_optimizer(params, c.optim, steps_per_epoch=1000,
                                       num_epochs=c.train.num_epochs)
  state = jax.jit(lambda p: create_train_state(p, tx, jax.random.key(1)), out_shardings=rep)(params)
  del params
  variant = os.environ.get("TIPR_BENCH_VARIANT", "engine")
  step_fn = make_train_step(method, tx, c, sched) if variant == "engine" else _unguarded_step(method, tx)
  step = jit_train_step(step_fn, rep, sharding.batch_sharded(mesh), rep)
  host = make_batch(cfg, batch, NUM_CLASSES[size], cap=c.mlm_positions_cap)
  gb = sharding.global_batch(host, mesh)
  _log("compile")
  t0 = time.perf_counter()
  compiled = step.lower(state, gb).compile()
  compile_s = time.perf_counter() - t0
  _log(f"compiled in {compile_s:.0f} s; warm-up step (RSS {common.status_kb('VmRSS') / 2**20:.2f} GiB)")
  t0 = time.perf_counter()
  state, m = compiled(state, gb)  # warm-up
  float(m["loss"])
  warmup_s = time.perf_counter() - t0
  base_kb = common.status_kb("VmRSS")
  common.reset_peak_rss()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, gb)
    float(m["loss"])
    times.append(time.perf_counter() - t0)
    _log(f"step {times[-1]:.2f} s")
  peak_kb = common.status_kb("VmHWM")
  flops = pair_flops(cfg, cmt_depth=CMT_DEPTH[size], num_classes=NUM_CLASSES[size],
                     mlm_positions=c.mlm_positions_cap, text_passes=1, batch=batch)
  out = dict(kind="jax_train", size=size, dtype=dtype, batch=batch, devices=devices,
             matmul_gflops=peak, compile_s=compile_s, warmup_s=warmup_s, step_s=times,
             loss=float(m["loss"]), finite=float(m["finite"]), flops=flops,
             xla_flops=float(compiled.cost_analysis().get("flops", float("nan"))),
             memory=_memory(compiled.memory_analysis()), rss_mb=base_kb / 1024,
             peak_rss_mb=peak_kb / 1024, variant=variant,
             xla_flags=os.environ.get("XLA_FLAGS", "").replace(TRACEME_FLAG, "").strip())
  if TRACEME_FLAG in os.environ.get("XLA_FLAGS", ""):
    state, out["profile"] = profile_step(compiled, state, gb)
    out["profiled"] = True
    _log("profiled one step")
  if breakdown:
    del compiled
    out["parts"] = _jax_parts(jax, jnp, method, state, tx, gb, steps)
    _log(f"parts {out['parts']}")
  return out


def _unguarded_step(method, tx):
  """An experiment: the engine's step without the keep-if-finite select and the grad norm
  (TIPR_BENCH_VARIANT=no_guard), to measure what that select costs."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from tipr_jax.training.train_step import TrainState, loss_and_grads  # pylint: disable=import-outside-toplevel

  def step(state, batch):
    b = jax.tree_util.tree_leaves(batch)[0].shape[0]
    batch = dict(batch, example_index=jnp.arange(b, dtype=jnp.int32))
    rng, step_rng = jax.random.split(state.rng)
    loss, metrics, grads = loss_and_grads(method, state.params, batch, step_rng, state.step, 1)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new, dict(metrics, loss=loss, finite=jnp.isfinite(loss).astype(jnp.float32))
  return step


def _time_fn(fn, args, reps: int) -> float:
  """Median seconds of fn(*args) (jitted), after one warm-up call."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return _median(times)


def _jax_parts(jax, jnp, method, state, tx, gb, reps: int) -> dict[str, float]:
  """Seconds of each part of the step run alone (forward + backward where it applies)."""
  import optax  # pylint: disable=import-outside-toplevel
  from tipr_jax.models.irra import IRRA  # pylint: disable=import-outside-toplevel
  model = method.model
  params = state.params

  def with_sub(path, sub):
    p = dict(params)
    p["base_model"] = dict(params["base_model"], **{path: sub})
    return p

  def tower_grad(path, method_fn, x):
    def f(sub):
      y = model.apply({"params": with_sub(path, sub)}, x, method=method_fn)
      return jnp.sum(y.astype(jnp.float32) ** 2)  # any scalar: fwd + full bwd of the tower
    return jax.jit(jax.grad(f))

  img_tokens = jax.jit(lambda p, x: model.apply({"params": p}, x, method=IRRA.image_tokens))(
      params, gb["images"])
  txt_tokens = jax.jit(lambda p, x: model.apply({"params": p}, x, method=IRRA.text_tokens))(
      params, gb["mlm_ids"])

  def heads_loss(hp, bp, img, txt, batch):
    """Everything after the towers: pooling, classifier, cross-former, capped MLM head, losses."""
    p = dict(hp, base_model=bp)
    from tipr_jax.methods.irra import mlm_token_losses  # pylint: disable=import-outside-toplevel
    from tipr_jax.models.clip import eot_pool  # pylint: disable=import-outside-toplevel
    def trunk(m):
      out = dict(image_feats=img[:, 0].astype(jnp.float32),
                 text_feats=eot_pool(txt, batch["mlm_ids"]).astype(jnp.float32))
      out["image_logits"] = m.classify(out["image_feats"])
      out["text_logits"] = m.classify(out["text_feats"])
      return out, m.cross_former(txt, img)
    out, cross = model.apply({"params": p}, method=trunk)
    tok = mlm_token_losses(model, p, cross, batch["mlm_labels"], 16)
    out.update({f"mlm_{k}": v for k, v in tok.items()})
    return method.loss(out, batch, 0)[0]

  heads = jax.jit(jax.grad(heads_loss, argnums=(0, 2, 3)))
  head_params = {k: v for k, v in params.items() if k != "base_model"}
  grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 1e-3), params)

  def update(params, opt_state, grads):
    """The step's tail as in train_step.py: Adam groups, grad norm, keep-if-finite select."""
    updates, opt = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    ok = jnp.isfinite(optax.tree.norm(grads))
    keep = lambda n, o: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), n, o)
    return keep(new, params), keep(opt, opt_state)

  parts = dict(
      vision_fwd_bwd=_time_fn(tower_grad("visual", IRRA.image_tokens, gb["images"]),
                              (params["base_model"]["visual"],), reps),
      text_fwd_bwd=_time_fn(tower_grad("text", IRRA.text_tokens, gb["mlm_ids"]),
                            (params["base_model"]["text"],), reps),
      heads_fwd_bwd=_time_fn(heads, (head_params, params["base_model"], img_tokens, txt_tokens, gb),
                             reps))
  upd = jax.jit(update, donate_argnums=(0, 1))  # in place, as in the donated train step
  p, o = state.params, state.opt_state
  p, o = jax.block_until_ready(upd(p, o, grads))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    p, o = jax.block_until_ready(upd(p, o, grads))
    times.append(time.perf_counter() - t0)
  parts["optimizer_update"] = _median(times)
  return parts


def jax_vit_worker(dtype: str, layers: int, batch: int, reps: int) -> dict:
  """GFLOP/s of forward + backward of a `layers`-layer ViT-B/16 image tower at 384x128 (the part
  that dominates the step), for trying XLA flags; with a numpy gauge of the machine's load."""
  jax = _jax_setup(1)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from benchmarks.irra_flops import patch_embed_flops  # pylint: disable=import-outside-toplevel
  from tipr_jax.models.clip import VisionTransformer  # pylint: disable=import-outside-toplevel
  from tipr_jax.models.flops import vision_flops  # pylint: disable=import-outside-toplevel
  cfg = clip_config("full", dtype).replace(vision_layers=layers)
  gauge0 = numpy_matmul_gflops()
  peak = jax_matmul_gflops(dtype=dtype)
  model = VisionTransformer(cfg)
  x = jnp.asarray(make_batch(cfg, batch, NUM_CLASSES["full"])["images"])
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x).astype(jnp.float32) ** 2)))
  sec = _time_fn(grad, (params,), reps)
  gauge1 = numpy_matmul_gflops()
  flops = batch * (3 * vision_flops(cfg) - patch_embed_flops(cfg))
  return dict(kind="jax_vit", dtype=dtype, layers=layers, batch=batch, s=sec,
              gflops=flops / sec / 1e9, matmul_gflops=peak, numpy_gflops=(gauge0 + gauge1) / 2,
              xla_flags=os.environ.get("XLA_FLAGS", ""))


_HLO_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_HLO_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _region(op_name: str) -> str:
  """Which part of the step an HLO instruction belongs to, from its jax op_name metadata."""
  back = "transpose(jvp" in op_name
  for key, name in (("IRRA.image_tokens", "vision"), ("IRRA.text_tokens", "text")):
    if key in op_name:
      return f"{name} {'backward' if back else 'forward'}"
  if "jvp" in op_name:
    return f"heads+losses {'backward' if back else 'forward'}"
  return "optimizer and rest"


def _kind(name: str, op_name: str) -> str:
  last = op_name.rsplit("/", 1)[-1] if op_name else name.split(".")[0]
  if "dot_general" in last or "conv" in last:
    return "matmul"
  if last.startswith(("copy", "transpose")) or name.startswith(("copy", "transpose")):
    return "copy/transpose"
  return "elementwise/reduce/other"


TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"


def profile_step(compiled, state, batch):
  """Thread-time of one run of a compiled train step by region (tower, direction) and op kind.

  Needs XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true at process start: every XLA CPU thunk is
  then a trace event named after its HLO instruction, whose op_name metadata in the compiled HLO
  says which part of the model it comes from. Returns (state, {by_region, by_kind}).
  """
  import collections  # pylint: disable=import-outside-toplevel
  import glob  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  meta = {}
  for line in compiled.as_text().splitlines():
    m = _HLO_NAME.match(line)
    if m:
      op = _HLO_OP_NAME.search(line)
      meta[m.group(1)] = op.group(1) if op else ""
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    state, m = compiled(state, batch)
    float(m["loss"])
    jax.profiler.stop_trace()
    pd = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  by_region, by_kind = collections.Counter(), collections.Counter()
  for plane in pd.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name not in meta or ev.name.startswith(("cond", "while", "call")):
          continue  # python frames, executor spans, and control-flow wrappers of nested thunks
        op = meta[ev.name]
        by_region[_region(op)] += ev.duration_ns / 1e9
        by_kind[f"{_region(op)} | {_kind(ev.name, op)}"] += ev.duration_ns / 1e9
  return state, dict(by_region=dict(by_region), by_kind=dict(by_kind))


def jax_encode_worker(size: str, dtype: str, batch: int, reps: int) -> dict:
  """Images/s and captions/s of the jitted evaluation encoders."""
  jax, _, cfg, method, mesh = _build_jax(size, dtype, 1)
  peak = jax_matmul_gflops()
  from tipr_jax.eval.evaluate import make_encoder  # pylint: disable=import-outside-toplevel
  from tipr_jax.training import sharding  # pylint: disable=import-outside-toplevel
  params = jax.jit(method.init)(jax.random.key(0))
  host = make_batch(cfg, batch, NUM_CLASSES[size])
  gb = sharding.global_batch(dict(images=host["images"], ids=host["caption_ids"]), mesh)
  out = dict(kind="jax_encode", size=size, dtype=dtype, batch=batch, matmul_gflops=peak)
  for name, fn, x in (("image", method.encode_image, gb["images"]),
                      ("text", method.encode_text, gb["ids"])):
    enc = make_encoder(fn, mesh)
    t0 = time.perf_counter()
    compiled = enc.lower(params, x).compile()
    out[f"{name}_compile_s"] = time.perf_counter() - t0
    out[f"{name}_s"] = _time_fn(compiled, (params, x), reps)
  return out


# ----------------------------------------------------------------------------------------------------
# PyTorch workers


def _build_torch(size: str):
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks import irra_torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  torch.manual_seed(0)
  cfg = clip_config(size)
  model = irra_torch.IRRATorch(cfg, NUM_CLASSES[size], CMT_DEPTH[size])
  return torch, irra_torch, cfg, model


def torch_train_worker(size: str, autocast: bool, batch: int, steps: int) -> dict:
  jnp_peak = jax_matmul_gflops()  # the same load gauge as the JAX workers
  torch, irra_torch, cfg, model = _build_torch(size)
  peak = torch_matmul_gflops()
  _log(f"torch_train {size} autocast={autocast}: jnp matmul {jnp_peak:.0f}, torch {peak:.0f} GFLOP/s")
  opt = irra_torch.make_adam(model)
  tb = irra_torch.to_torch_batch(make_batch(cfg, batch, NUM_CLASSES[size]))
  loss = irra_torch.train_step(model, opt, tb, autocast)  # warm-up (allocates Adam state)
  base_kb = common.status_kb("VmRSS")
  common.reset_peak_rss()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = irra_torch.train_step(model, opt, tb, autocast)
    times.append(time.perf_counter() - t0)
    _log(f"step {times[-1]:.2f} s")
  from benchmarks.irra_flops import pair_flops  # pylint: disable=import-outside-toplevel
  return dict(kind="torch_train", size=size, dtype="bf16 autocast" if autocast else "float32",
              batch=batch, matmul_gflops=jnp_peak, torch_matmul_gflops=peak, step_s=times, loss=loss,
              flops=pair_flops(cfg, cmt_depth=CMT_DEPTH[size], num_classes=NUM_CLASSES[size],
                               mlm_positions=None, text_passes=2, batch=batch),
              rss_mb=base_kb / 1024, peak_rss_mb=common.status_kb("VmHWM") / 1024,
              params=irra_torch.num_params(model))


def torch_encode_worker(size: str, batch: int, reps: int) -> dict:
  jnp_peak = jax_matmul_gflops()  # the same load gauge as the JAX workers
  torch, irra_torch, cfg, model = _build_torch(size)
  model.eval()
  tb = irra_torch.to_torch_batch(make_batch(cfg, batch, NUM_CLASSES[size]))
  out = dict(kind="torch_encode", size=size, batch=batch, matmul_gflops=jnp_peak)
  with torch.no_grad():
    for name, fn, x in (("image", model.base_model.encode_image, tb["images"]),
                        ("text", model.base_model.encode_text, tb["caption_ids"])):
      fn(x[:8])  # warm-up on a slice
      times = []
      for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
      out[f"{name}_s"] = _median(times)
  return out


# ----------------------------------------------------------------------------------------------------
# Driver


def _spawn(args: list[str], env: dict | None = None) -> dict | None:
  cmd = [sys.executable, "-m", "benchmarks.train_step", "--worker", *args]
  print("  $", " ".join(cmd[3:]), flush=True)
  t0 = time.perf_counter()
  with open(LOG, "a") as log:
    log.write(f"$ {' '.join(cmd[3:])}\n")
    log.flush()
    out = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                         check=False, env=dict(os.environ, **(env or {})))
  if out.returncode != 0:  # keep going: the other measurements are still worth writing
    print(f"   worker {args} FAILED (exit {out.returncode}); see {LOG}", flush=True)
    return None
  res = json.loads(out.stdout.strip().splitlines()[-1])
  res["wall_s"] = time.perf_counter() - t0
  print("   ", json.dumps(res)[:400], flush=True)
  return res


def _loadavg() -> str:
  return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _impl_label(r: dict) -> str:
  if r["kind"] == "torch_train":
    return "PyTorch reference (benchmarks/irra_torch.py)"
  if r.get("variant", "engine") != "engine":
    return "tipr_jax, experiment: step without the finite guard"
  if r.get("profiled"):
    return "tipr_jax (engine step), repeat with the XLA trace flag (profile below)"
  return "tipr_jax (engine step)" + (f", XLA_FLAGS={r['xla_flags']}" if r.get("xla_flags") else "")


def _train_section(res: list[dict], cmd: str, load: tuple[str, str]) -> str:
  jf = next(r for r in res if r["kind"] == "jax_train" and r["dtype"] == "float32"
            and r.get("variant", "engine") == "engine" and not r.get("profiled"))
  tf = next((r for r in res if r["kind"] == "torch_train" and r["dtype"] == "float32"), None)
  peak = jf["matmul_gflops"]
  batch = jf["batch"]
  cfg = clip_config(jf["size"])
  model = ("ViT-B/16 at 384x128, 12-layer text tower" if jf["size"] == "full" else
           f"small model: image {cfg.image_size[0]}x{cfg.image_size[1]}, widths {cfg.vision_width}/"
           f"{cfg.text_width}, {cfg.vision_layers}/{cfg.text_layers} layers, vocab {cfg.vocab_size}")
  lines = [SECTIONS[0], "",
           f"`{cmd}` ({model}, cmt_depth {CMT_DEPTH[jf['size']]}, {NUM_CLASSES[jf['size']]} ID "
           f"classes, batch {batch}, random data, MLM cap 16 positions; median of {len(jf['step_s'])} "
           "steps after a warm-up step; 2 threads; each row its own process, run one after the other; "
           f"load average {load[0]} at the start, {load[1]} at the end, on this 2-core machine "
           f"shared with other jobs). Peak: jnp 4096^3 float32 matmul, {peak:.0f} GFLOP/s "
           "(median of 5), measured in the JAX float32 process right before its steps. Every process "
           "measures it first as a load gauge; 'load-adjusted' divides each throughput by its own "
           "process's figure.", "",
           "| implementation | compute | s/step | pairs/s | vs torch f32 | load-adjusted "
           "| GFLOP/pair (train) | GFLOP/s | % of peak | peak RSS (steps) | XLA buffers |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in res:
    if r["kind"] not in ("jax_train", "torch_train"):
      continue
    sec = _median(r["step_s"])
    pps = r["batch"] / sec
    gf = r["flops"]["train"] / 1e9
    ratio = adj = "-"
    if tf:
      tpps = tf["batch"] / _median(tf["step_s"])
      ratio = f"{pps / tpps:.2f}x"
      adj = f"{(pps / r['matmul_gflops']) / (tpps / tf['matmul_gflops']):.2f}x"
    xla = f"{r['memory']['buffers_mb'] / 1024:.2f} GiB" if r.get("memory") else "-"
    lines.append(f"| {_impl_label(r)} | {r['dtype']} | {sec:.2f} | {pps:.2f} | {ratio} | {adj} | "
                 f"{gf:.1f} | {gf * pps:.0f} | {100 * gf * pps / peak:.0f}% | "
                 f"{r['peak_rss_mb'] / 1024:.2f} GiB | {xla} |")
  jax_rows = [r for r in res if r["kind"] == "jax_train"]
  lines += ["", "JAX compile and first step (the first run also JIT-compiles XLA's CPU kernels): " +
            "; ".join(f"{r['dtype']} {r.get('variant', 'engine')}: compile {r['compile_s']:.0f} s, "
                      f"first step {r['warmup_s']:.0f} s" if "warmup_s" in r else
                      f"{r['dtype']} {r.get('variant', 'engine')}: compile {r['compile_s']:.0f} s"
                      for r in jax_rows) + "."]
  f = jf["flops"]
  ref = tf["flops"] if tf else None
  lines += ["", "Analytic forward GFLOP per pair (benchmarks/irra_flops.py; matmuls only; training = 3x "
            "forward minus the patch embedding's input gradient; checked against XLA's and torch's "
            "counters in tests/test_benchmarks_train_step.py):", "",
            "| part | tipr_jax | reference |", "|---|---|---|"]
  for k in ("image", "text", "cross_attn", "cmt", "mlm_head", "classifier", "forward", "train"):
    lines.append(f"| {k} | {f[k] / 1e9:.2f} | " + (f"{ref[k] / 1e9:.2f} |" if ref else "- |"))
  lines += ["", "tipr_jax runs the text tower once (masked_caption_for_global) and the 512->49408 "
            "projection on 16 gathered positions per caption; the reference runs two text passes and "
            "the projection on all 77. XLA's own cost analysis of the compiled float32 step: "
            f"{jf['xla_flops'] / batch / 1e9:.1f} GFLOP per pair (it counts the larger branch of the "
            "MLM cap's `lax.cond`, i.e. the full 77-position fallback, and elementwise work)."]
  mem = jf["memory"]
  lines += ["", f"XLA memory analysis of the float32 step: arguments {mem['argument_size_mb']:.0f} MiB "
            f"(params + Adam state + batch; the state is donated: {mem['alias_size_mb']:.0f} MiB aliased "
            f"with the outputs), temporaries {mem['temp_size_mb']:.0f} MiB; 'XLA buffers' = arguments + "
            "outputs - aliased + temporaries. Peak RSS is the process high-water mark over the timed "
            "steps (counter reset after the warm-up step), runtime and compiled code included."]
  prof = next((r["profile"] for r in res if r.get("profile")), None)
  if prof:
    total = sum(prof["by_kind"].values())
    regions = sorted(prof["by_region"], key=lambda k: -prof["by_region"][k])
    kinds = ("matmul", "elementwise/reduce/other", "copy/transpose")
    lines += ["", "Profile of one float32 step (`jax.profiler` with "
              "`--xla_cpu_enable_xprof_traceme=true`, in its own process, one extra step after the timed ones; thread-time of every XLA thunk, attributed by its "
              "HLO op_name to a part of the model; share of the total traced thunk time, "
              f"{total:.1f} s over both threads):", "",
              "| part | total | matmul | elementwise/reduce/other | copy/transpose |",
              "|---|---|---|---|---|"]
    for reg in regions:
      cells = [f"{100 * prof['by_kind'].get(f'{reg} | {k}', 0.0) / total:.1f}%" for k in kinds]
      lines.append(f"| {reg} | {100 * prof['by_region'][reg] / total:.1f}% | " + " | ".join(cells) + " |")
    col = [sum(v for k, v in prof["by_kind"].items() if k.endswith(kind)) for kind in kinds]
    lines.append("| all | 100% | " + " | ".join(f"{100 * c / total:.1f}%" for c in col) + " |")
  if "parts" in jf:
    p = jf["parts"]
    total = sum(p.values())
    lines += ["", "The float32 step's parts jitted and timed alone (same batch; median):", "",
              "| part | s | share of the parts |", "|---|---|---|"]
    for k, v in p.items():
      lines.append(f"| {k} | {v:.2f} | {100 * v / total:.0f}% |")
    lines.append(f"| sum of parts / full step | {total:.2f} / {_median(jf['step_s']):.2f} | |")
  vit = [r for r in res if r["kind"] == "jax_vit"]
  if vit:
    base = {d: next((r for r in vit if r["dtype"] == d and not r["xla_flags"]), None)
            for d in ("float32", "bfloat16")}
    lines += ["", f"XLA flags and dtypes tried on the part that dominates (forward + backward of a "
              f"{vit[0]['layers']}-layer ViT-B/16 image tower at 384x128, batch {vit[0]['batch']}; each "
              "row its own process; 'load-adjusted' divides by a numpy/OpenBLAS 2048^3 matmul timed in "
              "the same process, which XLA flags cannot change):", "",
              "| compute | XLA_FLAGS | GFLOP/s | jnp matmul GFLOP/s | vs float32 default, load-adjusted |",
              "|---|---|---|---|---|"]
    b32 = base["float32"]
    for r in vit:
      adj = (f"{(r['gflops'] / r['numpy_gflops']) / (b32['gflops'] / b32['numpy_gflops']):.2f}x"
             if b32 else "-")
      lines.append(f"| {r['dtype']} | {r['xla_flags'] or '(default)'} | {r['gflops']:.0f} | "
                   f"{r['matmul_gflops']:.0f} | {adj} |")
  return "\n".join(lines) + "\n"


def _scaling_section(res: list[dict], cmd: str, load: tuple[str, str]) -> str:
  one = next(r for r in res if r["kind"] == "jax_train" and r["devices"] == 1)
  eight = next(r for r in res if r["kind"] == "jax_train" and r["devices"] == 8)
  s1, s8 = _median(one["step_s"]), _median(eight["step_s"])
  cfg = clip_config(one["size"])
  return "\n".join([
      SECTIONS[1], "",
      f"`{cmd}` (small model: image {cfg.image_size[0]}x{cfg.image_size[1]}, vision width "
      f"{cfg.vision_width} x {cfg.vision_layers} layers, text width {cfg.text_width} x "
      f"{cfg.text_layers} layers, vocab {cfg.vocab_size}, cmt_depth {CMT_DEPTH[one['size']]}, "
      f"{NUM_CLASSES[one['size']]} classes, float32; global batch {one['batch']}; median of "
      f"{len(one['step_s'])} steps; load average {load[0]} -> {load[1]}).", "",
      "| devices | s/step | vs 1 device | compile s | peak RSS (steps) |", "|---|---|---|---|---|",
      f"| 1 | {s1:.3f} | 1.00x | {one['compile_s']:.1f} | {one['peak_rss_mb'] / 1024:.2f} GiB |",
      f"| 8 (CPU fake devices) | {s8:.3f} | {s8 / s1:.2f}x time | {eight['compile_s']:.1f} | "
      f"{eight['peak_rss_mb'] / 1024:.2f} GiB |", "",
      "The 8 devices are `jax_num_cpu_devices=8` on the same 2 cores: there is no extra compute, so "
      "the figure measures the cost of data parallelism (per-device batch of "
      f"{one['batch'] // 8}, parameter replicas, gradient all-reduce, smaller matmuls), not a "
      "speed-up. Losses of both runs agree "
      f"({one['loss']:.6f} vs {eight['loss']:.6f}).", ""])


def _encode_section(res: list[dict], cmd: str, load: tuple[str, str]) -> str:
  from tipr_jax.models.flops import text_flops, vision_flops  # pylint: disable=import-outside-toplevel
  j = next(r for r in res if r["kind"] == "jax_encode" and r["dtype"] == "float32")
  t = next((r for r in res if r["kind"] == "torch_encode"), None)
  b = j["batch"]
  cfg = clip_config(j["size"])
  h, w = cfg.image_size
  fi, ft = vision_flops(cfg) / 1e9, text_flops(cfg) / 1e9
  peak = j.get("matmul_gflops")
  lines = [SECTIONS[2], "",
           f"`{cmd}` ({j['size']} size, batch {b}, random images {h}x{w} and "
           f"{cfg.context_length}-token captions; median of the timed batches after a warm-up; "
           f"2 threads; each row its own process; load average {load[0]} -> {load[1]}). Features "
           f"L2-normalized (make_encoder). Forward GFLOP: {fi:.1f} per image, {ft:.1f} per caption. "
           f"Peak: jnp 4096^3 float32 matmul in the JAX float32 process, {peak or float('nan'):.0f} "
           "GFLOP/s; 'load-adjusted' divides each rate by its own process's matmul figure.", "",
           "| implementation | images/s | GFLOP/s | % of peak | vs torch | load-adjusted "
           "| captions/s | vs torch | load-adjusted |", "|---|---|---|---|---|---|---|---|---|"]

  def ratios(r, key):
    if not t:
      return "-", "-"
    raw = t[key] / r[key]  # rate ratio = inverse time ratio
    if r.get("matmul_gflops") and t.get("matmul_gflops"):
      return f"{raw:.2f}x", f"{raw * t['matmul_gflops'] / r['matmul_gflops']:.2f}x"
    return f"{raw:.2f}x", "-"

  rows = [(f"tipr_jax {r['dtype']}", r) for r in res if r["kind"] == "jax_encode"]
  if t:
    rows.append(("PyTorch reference float32, no_grad", t))
  for name, r in rows:
    ir, tr = b / r["image_s"], b / r["text_s"]
    vi, ai = ratios(r, "image_s")
    vt, at = ratios(r, "text_s")
    pct = f"{100 * ir * fi / peak:.0f}%" if peak else "-"
    lines.append(f"| {name} | {ir:.1f} | {ir * fi:.0f} | {pct} | {vi} | {ai} | {tr:.1f} | {vt} | "
                 f"{at} |")
  return "\n".join(lines) + "\n"


def _add_section(sections: dict, title: str, fn, res: list, cmd: str, load0: str) -> None:
  """sections[title] = fn(...) over the workers that succeeded; left out if a baseline row failed."""
  try:
    sections[title] = fn([r for r in res if r], cmd, (load0, _loadavg()))
  except StopIteration:
    print(f"   {title}: a required measurement failed; section not written", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="train,scaling,encode")
  parser.add_argument("--size", default="full", choices=("full", "small"))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--encode-batch", type=int, default=64)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--breakdown", action="store_true", help="also time the step's parts alone")
  parser.add_argument("--no-profile", action="store_true")
  parser.add_argument("--variants", default="no_guard",
                      help="experimental step variants (TIPR_BENCH_VARIANT), comma-separated")
  parser.add_argument("--no-write", action="store_true")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="JAX compute dtypes (train)")
  parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for the JAX workers")
  parser.add_argument("--worker", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(_run_worker(args.worker)))
    return

  cmd = "python -m benchmarks.train_step " + " ".join(sys.argv[1:])
  parts = args.parts.split(",")
  sections = {}
  b, n, size = str(args.batch), str(args.steps), args.size
  jenv = {"XLA_FLAGS": args.xla_flags} if args.xla_flags else None
  if "train" in parts:
    load0 = _loadavg()
    res = [_spawn(["jax_train", size, dt, b, n, "1",
                   "1" if args.breakdown and dt == "float32" else "0"], jenv)
           for dt in args.dtypes.split(",")]
    if not args.no_profile:  # its own process: the trace flag must not touch the timed rows
      res.append(_spawn(["jax_train", size, "float32", b, "2", "1", "0"],
                        {"XLA_FLAGS": (args.xla_flags + " " + TRACEME_FLAG).strip()}))
    for variant in filter(None, args.variants.split(",")):
      res.append(_spawn(["jax_train", size, "float32", b, n, "1", "0"],
                        dict(jenv or {}, TIPR_BENCH_VARIANT=variant)))
    if not args.no_torch:
      res.append(_spawn(["torch_train", size, "0", b, n]))
      res.append(_spawn(["torch_train", size, "1", b, n]))
    if "flags" in parts:
      for dt, fl in FLAG_EXPERIMENTS:
        res.append(_spawn(["jax_vit", dt, "2", b, "3"], {"XLA_FLAGS": fl}))
    _add_section(sections, SECTIONS[0], _train_section, res, cmd, load0)
  if "scaling" in parts:
    load0 = _loadavg()
    res = [_spawn(["jax_train", "small", "float32", "16", "5", d, "0"], jenv) for d in ("1", "8")]
    _add_section(sections, SECTIONS[1], _scaling_section, res, cmd, load0)
  if "encode" in parts:
    load0 = _loadavg()
    eb = str(args.encode_batch)
    res = [_spawn(["jax_encode", size, dt, eb, "2"], jenv) for dt in args.dtypes.split(",")]
    if not args.no_torch:
      res.append(_spawn(["torch_encode", size, eb, "2"]))
    _add_section(sections, SECTIONS[2], _encode_section, res, cmd, load0)
  for body in sections.values():
    print(body)
  if not args.no_write and sections:
    for title, body in sections.items():
      print("wrote", common.write_section(title, body))


def _run_worker(w: list[str]) -> dict:
  kind = w[0]
  if kind == "jax_train":
    size, dtype, batch, steps, devices, breakdown = w[1:7]
    return jax_train_worker(size, dtype, int(batch), int(steps), int(devices), breakdown == "1")
  if kind == "torch_train":
    size, autocast, batch, steps = w[1:5]
    return torch_train_worker(size, autocast == "1", int(batch), int(steps))
  if kind == "jax_vit":
    dtype, layers, batch, reps = w[1:5]
    return jax_vit_worker(dtype, int(layers), int(batch), int(reps))
  if kind == "jax_encode":
    size, dtype, batch, reps = w[1:5]
    return jax_encode_worker(size, dtype, int(batch), int(reps))
  if kind == "torch_encode":
    size, batch, reps = w[1:4]
    return torch_encode_worker(size, int(batch), int(reps))
  raise ValueError(f"unknown worker {kind!r}")


if __name__ == "__main__":
  main()
