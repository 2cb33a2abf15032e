"""Memory of FMFA's EFA loss, forward + backward, chunked vs unchunked, at full size.

Run: `python -m benchmarks.efa_memory [--batch 64] [--chunks none,32,16,8,4]`.
Each case runs in its own subprocess (`--case CHUNK`), which jits
value_and_grad of `efa_loss` w.r.t. text tokens [B, 77, 512] and image patches
[B, 192, 512] (float32, code defaults: all 77 positions, margins 0.1/0.9), then
reports
  * XLA's compiled memory_analysis(): temp_size_in_bytes (scratch buffers the
    executable allocates, i.e. the live intermediates), plus argument/output sizes;
  * the process's peak RSS (VmHWM) after compile and after 3 executions, so the
    growth during execution is visible separately from the compiler's own peak;
  * the median CPU time (all threads of the process) and wall time of the executions
    (the machine is shared, so the wall time depends on the load; CPU time less so).
Writes a table to the '## EFA memory' section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION = "## EFA memory"
L_TEXT, N_PATCH, WIDTH = 77, 192, 512


def run_case(chunk: int | None, batch: int, repeats: int = 3) -> dict:
  """Compile and run one case in this process; returns the measurements."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tipr_jax.losses.fine_grained import efa_loss

  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.normal(size=(batch, L_TEXT, WIDTH)), jnp.float32)
  patches = jnp.asarray(rng.normal(size=(batch, N_PATCH, WIDTH)), jnp.float32)
  step = jax.jit(jax.value_and_grad(lambda t, v: efa_loss(t, v, chunk_size=chunk), argnums=(0, 1)))
  t0 = time.perf_counter()
  compiled = step.lower(text, patches).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  rss_compiled = common.status_kb("VmRSS")
  hwm_compiled = common.status_kb("VmHWM")
  loss, grads = compiled(text, patches)  # warm-up
  jax.block_until_ready((loss, grads))
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    loss, grads = compiled(text, patches)
    jax.block_until_ready((loss, grads))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return dict(chunk=chunk, batch=batch, loss=float(loss),
              temp_bytes=int(mem.temp_size_in_bytes), arg_bytes=int(mem.argument_size_in_bytes),
              out_bytes=int(mem.output_size_in_bytes), rss_compiled_kb=rss_compiled,
              hwm_compiled_kb=hwm_compiled, hwm_run_kb=common.status_kb("VmHWM"),
              compile_s=compile_s, step_s=float(sorted(times)[len(times) // 2]),
              step_cpu_s=float(sorted(cpu)[len(cpu) // 2]), load=os.getloadavg()[0])


def _mib(n_bytes: float) -> str:
  return f"{n_bytes / 2**20:,.0f}"


def format_section(results: list[dict], command: str) -> str:
  b = results[0]["batch"]
  full = b * b * N_PATCH * L_TEXT * 4
  full_t = b * b * L_TEXT * L_TEXT * 4
  lines = [
      SECTION, "",
      f"`{command}` (float32, B={b}, L={L_TEXT} text positions, N={N_PATCH} patches, D={WIDTH}; "
      "jit of value_and_grad of `efa_loss` w.r.t. text tokens and patches, FMFA code defaults; "
      "one subprocess per row). `XLA temp` is `compiled.memory_analysis().temp_size_in_bytes`, "
      "the scratch the executable allocates for intermediates (arguments and outputs, "
      f"{_mib(results[0]['arg_bytes'])} + {_mib(results[0]['out_bytes'])} MiB, are extra). "
      "`RSS` is the process's VmRSS after compiling, `peak RSS` its VmHWM after 4 executions "
      "(includes the Python/JAX baseline and the compiler's own peak). Step: median of 3 "
      "executions after a warm-up, CPU seconds of the process (all threads) and wall seconds; "
      "2-core machine shared with other jobs (load average "
      f"{min(r['load'] for r in results):.0f}-{max(r['load'] for r in results):.0f} during the "
      "runs), so the wall time is only a rough guide.",
      "",
      f"For scale: the whole cosine tensor of the patch term, [B, B, {N_PATCH}, {L_TEXT}] float32, "
      f"is {_mib(full)} MiB; the text term's [B, B, {L_TEXT}, {L_TEXT}] is {_mib(full_t)} MiB.",
      "",
      "| chunk_size | XLA temp (MiB) | RSS after compile (MiB) | peak RSS (MiB) | step CPU (s) "
      "| step wall (s) | loss |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    name = "none (unchunked)" if r["chunk"] is None else str(r["chunk"])
    lines.append(f"| {name} | {_mib(r['temp_bytes'])} | {r['rss_compiled_kb'] / 1024:,.0f} | "
                 f"{r['hwm_run_kb'] / 1024:,.0f} | {r['step_cpu_s']:.2f} | {r['step_s']:.2f} | "
                 f"{r['loss']:.6f} |")
  base = next((r for r in results if r["chunk"] is None), None)
  chunked = [r for r in results if r["chunk"] is not None]
  if base is not None and chunked:
    best = min(chunked, key=lambda r: r["temp_bytes"])
    lines += ["", f"Chunking over rows of {best['chunk']} cuts the XLA scratch from "
              f"{_mib(base['temp_bytes'])} to {_mib(best['temp_bytes'])} MiB "
              f"({base['temp_bytes'] / max(best['temp_bytes'], 1):.1f}x); the loss is the same "
              "value in every row (the chunked path recomputes each block in the backward pass "
              "under jax.checkpoint instead of keeping the whole [B, B, L, N] max mask)."]
  return "\n".join(lines) + "\n"


def _parse_chunk(s: str) -> int | None:
  return None if s.lower() == "none" else int(s)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--chunks", default="none,32,16,8,4",
                  help="comma-separated chunk sizes; 'none' = unchunked")
  ap.add_argument("--case", default=None, help="internal: run one chunk size and print JSON")
  ap.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
  args = ap.parse_args(argv)
  if args.case is not None:
    print(json.dumps(run_case(_parse_chunk(args.case), args.batch)))
    return
  results = []
  for c in args.chunks.split(","):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.efa_memory", "--case", c,
                           "--batch", str(args.batch)], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"benchmarks.efa_memory case {c} failed:\n{proc.stderr[-2000:]}")
    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(results[-1], flush=True)
  command = "python -m benchmarks.efa_memory"
  if args.batch != 64 or args.chunks != "none,32,16,8,4":
    command += f" --batch {args.batch} --chunks {args.chunks}"
  text = format_section(results, command)
  print(text)
  if not args.no_write:
    print(f"wrote {common.write_section(SECTION, text)}")


if __name__ == "__main__":
  main()
