"""Tokenizer / masking / BPE-builder throughput.

Run: `python -m benchmarks.tokenizer [--vocab PATH] [--n 100000]`. Prints the figures and
writes them to the '## Tokenizer' section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from tipr_jax.data import masking
from tipr_jax.data.tokenizer import Tokenizer, build_bpe_vocab

from benchmarks import common

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VOCAB = REPO_ROOT.parent / "shared" / "data" / "bpe_simple_vocab_16e6.txt.gz"
SECTION = "## Tokenizer"


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
  """Person-description-like captions from a fixed word list (~1.5k distinct words, 10-40 words)."""
  rng = random.Random(seed)
  base = ("man woman boy girl person lady wears wearing carries carrying holds a an the with and "
          "red blue green black white grey yellow pink purple brown orange navy beige dark light "
          "shirt t-shirt jacket coat pants jeans shorts skirt dress shoes sneakers boots bag "
          "backpack hat cap glasses scarf umbrella sweater hoodie long short sleeves hair "
          "his her is are in on of at walking standing").split()
  fillers = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(1500)]
  out = []
  for _ in range(n):
    words = [rng.choice(base) if rng.random() < 0.8 else rng.choice(fillers)
             for _ in range(rng.randint(10, 40))]
    out.append(("The " + " ".join(words) + rng.choice([".", ". ", "!", " ."])).replace(" ,", ","))
  return out


def _rate(n: int, seconds: float) -> str:
  return f"{n / seconds:,.0f}/s"


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--vocab", default=str(DEFAULT_VOCAB))
  parser.add_argument("--n", type=int, default=100_000)
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args()

  captions = synthetic_captions(args.n)
  lines = []
  t = time.perf_counter()
  tok = Tokenizer.from_pretrained(args.vocab)
  lines.append(f"- load CLIP vocabulary: {time.perf_counter() - t:.2f} s")
  t = time.perf_counter()
  ids = tok(captions)
  dt = time.perf_counter() - t
  lines.append(f"- `Tokenizer.__call__`, {args.n:,} captions, cold word cache: {dt:.2f} s "
               f"({_rate(args.n, dt)} captions)")
  dts = []
  for _ in range(3):
    t = time.perf_counter()
    tok(captions)
    dts.append(time.perf_counter() - t)
  dt = min(dts)
  lines.append(f"- same, warm word cache, best of 3: {dt:.2f} s ({_rate(args.n, dt)} captions; "
               f"worst {_rate(args.n, max(dts))})")
  m = min(args.n, 20_000)
  t = time.perf_counter()
  for c in captions[:m]:
    masking.encode_with_words(tok, c)
  dt = time.perf_counter() - t
  lines.append(f"- `encode_with_words`: {_rate(m, dt)} captions")

  rng = np.random.default_rng(0)
  t = time.perf_counter()
  for row in ids[:m]:
    masking.mlm_mask(row, rng, mask_id=tok.mask_id)
  dt = time.perf_counter() - t
  lines.append(f"- `mlm_mask` per caption: {dt / m * 1e6:.1f} us")
  t = time.perf_counter()
  for start in range(0, m, 64):
    masking.mlm_mask_batch(ids[start:start + 64], rng, mask_id=tok.mask_id)
  dt = time.perf_counter() - t
  lines.append(f"- `mlm_mask_batch`, batches of 64: {dt / m * 1e6:.1f} us per caption")

  with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    path = build_bpe_vocab(captions[:20_000], 2000, Path(tmp) / "v.txt.gz")
    dt = time.perf_counter() - t
    small = Tokenizer.from_pretrained(path)
  lines.append(f"- `build_bpe_vocab`, 20,000 captions, 2000 merges requested: {dt:.2f} s "
               f"(vocab_size {small.vocab_size})")

  body = "\n".join(lines)
  print(body)
  if not args.no_write:
    section = (f"{SECTION}\n\n`python -m benchmarks.tokenizer` (synthetic captions of 10-40 "
               f"words, one CPU process; the machine is shared, timings vary up to ~2x).\n\n{body}\n")
    print("wrote", common.write_section(SECTION, section))


if __name__ == "__main__":
  main()
