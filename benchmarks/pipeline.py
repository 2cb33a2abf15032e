"""Training input pipeline throughput (decode + augment + tokenize + mask + batch) at 384x128.

Run: `python -m benchmarks.pipeline [--identities 64] [--batches 12] [--batch 32]`. Generates a
synthetic CUHK-layout dataset (tipr_jax.data.synthetic), prepares it as ArrayRecord, then times
the Grain training iterator with 0, 1 and 2 worker processes. "per core" = images per CPU-second
summed over the main process (all its threads) and the worker processes during the timed window.
Prints the figures and writes them to the '## Input pipeline' section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import time
from pathlib import Path

import numpy as np
from absl import flags

from tipr_jax.data import masking
from tipr_jax.data import pipeline
from tipr_jax.data import prepare
from tipr_jax.data import synthetic
from tipr_jax.data import transforms
from tipr_jax.data.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP_VOCAB = REPO_ROOT.parent / 'shared' / 'data' / 'bpe_simple_vocab_16e6.txt.gz'
SECTION = '## Input pipeline'
SIZE = (384, 128)
_TICK = os.sysconf('SC_CLK_TCK')


def _proc_cpu(pid: int) -> float:
  """utime + stime of a process in seconds (Linux /proc)."""
  try:
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
  except FileNotFoundError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / _TICK


def _cpu_now() -> tuple[float, dict[int, float]]:
  return time.process_time(), {p.pid: _proc_cpu(p.pid) for p in multiprocessing.active_children()}


def _cpu_since(start) -> float:
  own0, kids0 = start
  own1, kids1 = _cpu_now()
  return (own1 - own0) + sum(kids1[p] - kids0.get(p, 0.0) for p in kids1)


def time_pipeline(data_dir, tok, *, workers: int, batch: int, batches: int, warmup: int = 2):
  it = pipeline.make_train_iterator(data_dir=data_dir, dataset='synthetic', tokenizer=tok,
                                    global_batch_size=batch, seed=0, image_size=SIZE,
                                    num_workers=workers)
  try:
    for _ in range(warmup):
      next(it)
    cpu0 = _cpu_now()
    t0 = time.perf_counter()
    for _ in range(batches):
      b = next(it)
      assert b['images'].shape == (batch, *SIZE, 3)
    wall = time.perf_counter() - t0
    cpu = _cpu_since(cpu0)
  finally:
    if hasattr(it, 'close'):
      it.close()
  n = batch * batches
  return n / wall, n / cpu


def time_stages(records, captions, tok, reps: int = 3) -> dict[str, float]:
  """CPU seconds per item of each stage, one item at a time through all stages (as in the
  pipeline), single thread, thread CPU time (robust to other jobs' load)."""
  rng = np.random.default_rng(0)
  names = ['decode JPEG/PNG', 'resize (PIL bilinear)', 'flip + pad + crop (uint8)',
           'normalize to float32', 'random erasing', 'tokenize', 'MLM mask']
  acc = dict.fromkeys(names, 0.0)
  clock = time.thread_time
  n = 0
  for _ in range(reps):
    for r, caption in zip(records, captions):
      t0 = clock()
      img = transforms.decode(r['image'])
      img.load()
      t1 = clock()
      arr = transforms.resize(img, SIZE)
      t2 = clock()
      arr = transforms.flip_pad_crop(arr, rng)
      t3 = clock()
      x = transforms.normalize(arr)
      t4 = clock()
      transforms.random_erase(x, rng)
      t5 = clock()
      ids = tok([caption])[0]
      t6 = clock()
      masking.mlm_mask(ids, rng, mask_id=tok.mask_id)
      t7 = clock()
      for k, (a, b) in zip(names, [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6),
                                   (t6, t7)]):
        acc[k] += b - a
      n += 1
  return {k: v / n for k, v in acc.items()}


def write_docs(text: str) -> Path:
  doc = REPO_ROOT / 'docs' / 'performance.md'
  old = doc.read_text() if doc.exists() else '# Performance\n'
  pattern = re.compile(rf'^{re.escape(SECTION)}\n.*?(?=^## |\Z)', re.S | re.M)
  if pattern.search(old):
    new = pattern.sub(lambda _: text.rstrip('\n') + '\n\n', old).rstrip('\n') + '\n'
  else:
    new = old.rstrip('\n') + '\n\n' + text.rstrip('\n') + '\n'
  doc.parent.mkdir(parents=True, exist_ok=True)
  doc.write_text(new)
  return doc


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='/tmp/tipr_bench_pipeline')
  parser.add_argument('--identities', type=int, default=64)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--batches', type=int, default=12)
  parser.add_argument('--workers', default='0,1,2')
  parser.add_argument('--no_docs', action='store_true')
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags

  work = Path(args.workdir)
  raw = synthetic.generate(work / 'raw', identities=args.identities, seed=0, layout='cuhk')
  data_dir = work / 'tfds'
  if not prepare.output_dir('synthetic', data_dir).exists():
    prepare.prepare('synthetic', data_dir=data_dir, manual_dir=raw, progress=False)
  vocab = CLIP_VOCAB if CLIP_VOCAB.exists() else raw / 'bpe_vocab.txt.gz'
  tok = Tokenizer.from_pretrained(vocab)
  info = pipeline.dataset_info(data_dir=data_dir, dataset='synthetic')
  src = pipeline.data_source(data_dir=data_dir, dataset='synthetic', split='train')
  records = [src[i] for i in range(min(len(src), 128))]
  captions = [r['captions'][0].decode() for r in records]
  sizes = [transforms.decode(r['image']).size for r in records[:8]]

  stages = time_stages(records, captions, Tokenizer.from_pretrained(vocab))
  rows = []
  for w in [int(x) for x in args.workers.split(',')]:
    wall, per_cpu = time_pipeline(data_dir, tok, workers=w, batch=args.batch,
                                  batches=args.batches)
    rows.append((w, wall, per_cpu))
    print(f'workers={w}: {wall:.0f} images/s wall, {per_cpu:.0f} images per CPU-second')

  cores = os.cpu_count()
  load = os.getloadavg()[0]
  lines = [
      SECTION, '',
      f'`python -m benchmarks.pipeline` (synthetic CUHK layout, {info.num_train_captions} train '
      f'captions, source images {sizes[0][1]}x{sizes[0][0]} JPEG/PNG, output {SIZE[0]}x{SIZE[1]} '
      f'float32, augmentation + IRRA MLM masking, CLIP BPE {"(real vocabulary)" if vocab == CLIP_VOCAB else "(synthetic vocabulary)"}, '
      f'global batch {args.batch}, {args.batches} timed batches after 2 warm-up; {cores}-core '
      f'machine shared with other jobs, load average {load:.1f} at the end, so wall figures are '
      'noisy). "per CPU-second" divides by '
      'the CPU time of the main process and its workers in the timed window: the per-core rate.',
      '',
      '| worker processes | images/s (wall) | images per CPU-second (per core) |',
      '|---|---|---|',
  ]
  lines += [f'| {w} | {wall:.0f} | {pc:.0f} |' for w, wall, pc in rows]
  lines += ['', 'Single-thread CPU cost per item of each stage (one item at a time through '
            'all stages; tokenizer word cache warm after the first of 3 passes):', '',
            '| stage | CPU us per item |', '|---|---|']
  lines += [f'| {k} | {v * 1e6:.0f} |' for k, v in stages.items()]
  total = sum(stages.values())
  lines += [f'| sum | {total * 1e6:.0f} (= {1 / total:.0f} items/s per core) |', '']
  per_image = {w: 1e6 / pc for w, _, pc in rows}
  if 0 in per_image:
    lines += [
        f'Target: >= 500 training images per CPU-second. With no worker process the whole '
        f'pipeline costs {per_image[0]:.0f} us of CPU per image against {total * 1e6:.0f} us for '
        'the stages above; the rest is record reading and parsing (TFDS), Grain, batching and '
        'the two reader threads. Worker processes add the transfer of every float32 batch '
        'through shared memory. On this shared machine the per-core figure varies by about '
        '+-15 % between runs.', '']
  text = '\n'.join(lines)
  print(text)
  if not args.no_docs:
    print(f'wrote {write_docs(text)}')


if __name__ == '__main__':
  main()
