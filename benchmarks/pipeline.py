"""Training input pipeline throughput (decode + augment + tokenize + mask + batch) at 384x128.

Run: `python -m benchmarks.pipeline [--identities 64] [--batches 24] [--batch 32]`. Generates a
synthetic CUHK-layout dataset (tipr_jax.data.synthetic), prepares it as ArrayRecord, then times
the Grain training iterator with 0, 1 and 2 worker processes. "per core" = images per CPU-second
summed over the main process (all its threads) and the worker processes during the timed window.

The pipeline ships uint8 pixels and erase boxes; the train step normalizes on the device. The
same-run baseline is the design the reference's DataLoader uses: float32 normalized (and erased)
images made on the host, i.e. the same pipeline plus a host-side normalize + erase map. The
device-side cost of the normalization is timed too (jit on this CPU).
Prints the figures and writes them to the '## Input pipeline' section of docs/performance.md.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path

import grain
import jax
import numpy as np
from absl import flags

from benchmarks import common
from tipr_jax.data import device_images
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
TARGET_PER_CORE = 500  # training images per CPU-second (issue #3)
TPU_PAIRS_PER_S = 4000  # a TPU v5e-8 host at 40 % utilisation (issue #3)
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


# The baseline's host-side normalisation: a per-channel table (x / 255 - mean) / std in float64.
_LUT = ((np.arange(256, dtype=np.float64)[None, :] / 255.0
         - transforms.CLIP_MEAN.astype(np.float64)[:, None])
        / transforms.CLIP_STD.astype(np.float64)[:, None]).astype(np.float32)


def host_normalize(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """Baseline: uint8 [..., H, W, 3] -> normalized float32 on the host, erase boxes filled.
  Image by image (as a per-example map would), which keeps each image's table lookups in cache."""
  out = np.empty(images.shape, np.float32)
  flat_in = images.reshape((-1,) + images.shape[-3:])
  flat_out = out.reshape((-1,) + out.shape[-3:])
  for src, img, (top, left, h, w) in zip(flat_in, flat_out, boxes.reshape(-1, 4)):
    for c in range(3):
      np.take(_LUT[c], src[..., c], out=img[..., c])
    img[top:top + h, left:left + w] = transforms.CLIP_MEAN
  return out


def _host_float_batch(batch: dict) -> dict:
  batch = dict(batch)
  batch['images'] = host_normalize(batch['images'], batch.pop('erase_boxes'))
  return batch


def time_pipeline(data_dir, tok, *, workers: int, batch: int, batches: int, host_float: bool,
                  warmup: int = 2) -> tuple[float, float]:
  """(images/s wall, images per CPU-second) of the training iterator, as make_train_iterator
  builds it; `host_float` adds the baseline's host-side normalisation to every batch."""
  ds = pipeline.train_dataset(data_dir=data_dir, dataset='synthetic', tokenizer=tok,
                              global_batch_size=batch, seed=0, image_size=SIZE)
  if host_float:
    ds = ds.map(_host_float_batch)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  if workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                           per_worker_buffer_size=1))
  it = iter(it_ds)
  try:
    for _ in range(warmup):
      next(it)
    cpu0 = _cpu_now()
    t0 = time.perf_counter()
    for _ in range(batches):
      b = next(it)
      assert b['images'].shape == (batch, *SIZE, 3)
      assert b['images'].dtype == (np.float32 if host_float else np.uint8)
    wall = time.perf_counter() - t0
    cpu = _cpu_since(cpu0)
  finally:
    if hasattr(it, 'close'):
      it.close()
  n = batch * batches
  return n / wall, n / cpu


def time_stages(records, captions, tok, reps: int = 3) -> dict[str, float]:
  """CPU seconds per item of each host stage, one item at a time through all stages (as in the
  pipeline), single thread, thread CPU time (robust to other jobs' load). The last entry is the
  baseline's extra host work, timed alongside but not part of the pipeline."""
  rng = np.random.default_rng(0)
  names = ['decode JPEG/PNG', 'resize (PIL bilinear)', 'flip + pad + crop (uint8)',
           'erase box draw', 'tokenize', 'MLM mask']
  baseline = 'baseline only: normalize to float32 + erase on the host'
  acc = dict.fromkeys(names + [baseline], 0.0)
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
      box = transforms.random_erase_box(*SIZE, rng)
      t4 = clock()
      ids = tok([caption])[0]
      t5 = clock()
      masking.mlm_mask(ids, rng, mask_id=tok.mask_id)
      t6 = clock()
      host_normalize(arr, box)
      t7 = clock()
      for k, (a, b) in zip(names + [baseline], [(t0, t1), (t1, t2), (t2, t3), (t3, t4),
                                               (t4, t5), (t5, t6), (t6, t7)]):
        acc[k] += b - a
      n += 1
  return {k: v / n for k, v in acc.items()}


def time_device_normalize(batch: int, reps: int = 10) -> float:
  """Seconds per image of the jitted device-side normalize + erase on this machine's CPU."""
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, *SIZE, 3), dtype=np.uint8))
  boxes = jax.device_put(np.tile(np.array([[100, 20, 80, 40]], np.int32), (batch, 1)))
  fn = jax.jit(device_images.model_images)
  fn(images, boxes).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    fn(images, boxes).block_until_ready()
  return (time.perf_counter() - t0) / (reps * batch)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='/tmp/tipr_bench_pipeline')
  parser.add_argument('--identities', type=int, default=64)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--batches', type=int, default=24)
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

  load0 = os.getloadavg()[0]
  stages = time_stages(records, captions, Tokenizer.from_pretrained(vocab))
  device_s = time_device_normalize(args.batch)
  rows = []
  for w in [int(x) for x in args.workers.split(',')]:
    got = {}
    for host_float in (False, True):  # interleaved: each pair sees the same machine state
      got[host_float] = time_pipeline(data_dir, tok, workers=w, batch=args.batch,
                                      batches=args.batches, host_float=host_float)
    rows.append((w, got[False], got[True]))
    print(f'workers={w}: uint8 {got[False][0]:.0f} images/s wall, {got[False][1]:.0f} per '
          f'CPU-second; float32 baseline {got[True][0]:.0f} / {got[True][1]:.0f}')
  load1 = os.getloadavg()[0]
  quiet = max(load0, load1) < 1.0
  pipe_stages = {k: v for k, v in stages.items() if not k.startswith('baseline')}
  total = sum(pipe_stages.values())
  lines = [
      SECTION, '',
      f'`python -m benchmarks.pipeline` (synthetic CUHK layout, {info.num_train_captions} train '
      f'captions, source images {sizes[0][1]}x{sizes[0][0]} JPEG/PNG, output {SIZE[0]}x{SIZE[1]} '
      f'uint8 + erase boxes, augmentation + IRRA MLM masking, CLIP BPE '
      f'{"(real vocabulary)" if vocab == CLIP_VOCAB else "(synthetic vocabulary)"}, global batch '
      f'{args.batch}, {args.batches} timed batches after 2 warm-up; {os.cpu_count()}-core machine, '
      f'load average {load0:.1f} at the start and {load1:.1f} at the end'
      f'{", a quiet machine" if quiet else ": shared with other jobs, so wall figures are noisy"}). '
      '"per CPU-second" divides by the CPU time of the main process and its workers in the timed '
      'window: the per-core rate. The baseline, timed in the same run and interleaved with it, is '
      'the reference\'s design: the same pipeline making normalized, erased float32 images on the '
      'host (4x the bytes through worker shared memory and to the device).',
      '',
      '| worker processes | images/s (wall) | images per CPU-second (per core) | baseline float32 '
      'on host: wall, per CPU-second | per-core gain over the baseline |',
      '|---|---|---|---|---|',
  ]
  lines += [f'| {w} | {u[0]:.0f} | {u[1]:.0f} | {f[0]:.0f}, {f[1]:.0f} | {u[1] / f[1]:.2f}x |'
            for w, u, f in rows]
  lines += ['', 'Single-thread CPU cost per item of each host stage (one item at a time through '
            'all stages; tokenizer word cache warm after the first of 3 passes):', '',
            '| stage | CPU us per item |', '|---|---|']
  lines += [f'| {k} | {v * 1e6:.0f} |' for k, v in pipe_stages.items()]
  lines += [f'| sum | {total * 1e6:.0f} (= {1 / total:.0f} items/s per core) |']
  lines += [f'| {k} | {v * 1e6:.0f} |' for k, v in stages.items() if k.startswith('baseline')]
  lines += ['', f'On the device, normalize + erase inside the jitted step costs '
            f'{device_s * 1e6:.0f} us per image on this CPU (XLA, batch {args.batch}); on an '
            'accelerator it is a fused elementwise pass over the input, negligible next to the '
            'model.', '']
  per_image = {w: 1e6 / u[1] for w, u, _ in rows}
  ok = lambda b: 'met' if b else 'NOT met'  # noqa: E731
  lines += [f'- target >= {TARGET_PER_CORE} training images per CPU-second: '
            + '; '.join(f'{w} worker(s) {u[1]:.0f} ({ok(u[1] >= TARGET_PER_CORE)})'
                        for w, u, _ in rows) + '.']
  worst = min(u[1] for _, u, _ in rows)
  lines += [
      f'- against the consumer: a TPU v5e-8 host training this model at ~{TPU_PAIRS_PER_S:,} '
      f'pairs/s (the issue\'s 40 % utilisation figure; "TPU / GPU estimate" above) needs about '
      f'{TPU_PAIRS_PER_S / worst:.0f} cores at the slowest per-core rate above, of its 224 '
      'vCPUs; the full-size step on this 2-core CPU consumes ~1.2 pairs/s ("Training step"), '
      f'which one core feeds {worst / 1.2:.0f}x over.']
  if 0 in per_image:
    lines += [
        f'- with no worker process the whole pipeline costs {per_image[0]:.0f} us of CPU per '
        f'image against {total * 1e6:.0f} us for the stages above; the rest is record reading '
        'and parsing (TFDS), Grain, batching and the two reader threads. Worker processes add '
        'the transfer of every batch through shared memory.']
  lines += ['']
  text = '\n'.join(lines)
  print(text)
  if not args.no_docs:
    print(f'wrote {common.write_section(SECTION, text)}')


if __name__ == '__main__':
  main()
