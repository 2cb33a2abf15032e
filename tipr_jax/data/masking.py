"""Caption masking for masked-language modelling (IRRA §4) and attribute-word masking.

All functions are numpy-only and deterministic for a given `np.random.Generator`
state. Each call consumes a fixed number of uniforms (independent of the data), so
`mlm_mask_batch(ids, rng)` equals row-by-row `mlm_mask` calls with the same rng.

Random replacement tokens are drawn uniformly from 1..vocab_size_for_random-1
(IRRA: vocab_size_for_random = mask_id = 49405, i.e. 1..49404).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import AbstractSet, Sequence

import numpy as np

from tipr_jax.data.tokenizer import Tokenizer, pretokenize

_MASK_FRACTION = 0.8  # of selected tokens -> mask token
_RANDOM_FRACTION = 0.1  # of selected tokens -> random token (rest: kept)


def _check_args(mask_id: int, vocab_size_for_random: int | None, prob: float) -> int:
  """Validates masking arguments; returns the exclusive upper bound for random ids."""
  if mask_id < 2:
    raise ValueError(f"mask_id must be >= 2, got {mask_id}.")
  hi = mask_id if vocab_size_for_random is None else int(vocab_size_for_random)
  if not 2 <= hi <= mask_id:
    raise ValueError(
        f"vocab_size_for_random must be in [2, mask_id={mask_id}] (random ids are drawn from "
        f"1..vocab_size_for_random-1), got {vocab_size_for_random}.")
  if not 0.0 < prob <= 1.0:
    raise ValueError(f"prob must be in (0, 1], got {prob}.")
  return hi


def _replace(ids: np.ndarray, selected: np.ndarray, v: np.ndarray, u_rand: np.ndarray,
             mask_id: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
  """80/10/10 replacement of the selected positions.

  v in [0, 1) decides mask (< 0.8) / random (< 0.9) / keep; u_rand in [0, 1) gives the
  random id 1 + floor(u_rand * (hi - 1)). Labels: original id where selected, else 0.
  """
  rand_ids = 1 + np.minimum((u_rand * (hi - 1)).astype(np.int64), hi - 2)
  out = ids.copy()
  out = np.where(selected & (v < _MASK_FRACTION), mask_id, out)
  to_rand = selected & (v >= _MASK_FRACTION) & (v < _MASK_FRACTION + _RANDOM_FRACTION)
  out = np.where(to_rand, rand_ids, out)
  labels = np.where(selected, ids, 0)
  return out.astype(np.int32), labels.astype(np.int32)


def mlm_mask_batch(token_ids: np.ndarray, rng: np.random.Generator, *, mask_id: int,
                   vocab_size_for_random: int | None = None,
                   prob: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
  """IRRA MLM masking of each row of int [N, L] ids -> (masked int32 [N, L], labels int32 [N, L]).

  Candidates: 0 < id < mask_id. Each candidate is selected with `prob`; a selected token
  becomes mask_id (80%), a random id in 1..vocab_size_for_random-1 (10%) or stays (10%).
  Labels hold the original id at selected positions, 0 elsewhere. A row with no selected
  position gets labels[1] = ids[1] and ids[1] = mask_id. Consumes N * 2L uniforms.
  """
  ids = np.asarray(token_ids)
  if ids.ndim != 2 or ids.shape[1] < 2:
    raise ValueError(f"token_ids must have shape [N, L] with L >= 2, got {ids.shape}.")
  hi = _check_args(mask_id, vocab_size_for_random, prob)
  n, length = ids.shape
  u = rng.random((n, 2 * length))
  u_sel, u_rand = u[:, :length], u[:, length:]
  ids = ids.astype(np.int64)
  selected = (ids > 0) & (ids < mask_id) & (u_sel < prob)
  # As IRRA: a selected candidate's u / prob is uniform in [0, 1) and picks the replacement.
  out, labels = _replace(ids, selected, u_sel / prob, u_rand, mask_id, hi)
  empty = ~selected.any(axis=1)
  labels[empty, 1] = ids[empty, 1]
  out[empty, 1] = mask_id
  return out, labels


def mlm_mask(token_ids: np.ndarray, rng: np.random.Generator, *, mask_id: int,
             vocab_size_for_random: int | None = None,
             prob: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
  """IRRA MLM masking of one caption, int [L] -> (masked int32 [L], labels int32 [L]).

  See `mlm_mask_batch`; `vocab_size_for_random=None` means mask_id (IRRA).
  """
  ids = np.asarray(token_ids)
  if ids.ndim != 1:
    raise ValueError(f"token_ids must have shape [L], got {ids.shape}.")
  out, labels = mlm_mask_batch(ids[None], rng, mask_id=mask_id,
                               vocab_size_for_random=vocab_size_for_random, prob=prob)
  return out[0], labels[0]


def attribute_mask(token_ids: np.ndarray, word_ids: np.ndarray, is_attribute_word: np.ndarray,
                   rng: np.random.Generator, *, mask_id: int,
                   vocab_size_for_random: int | None = None,
                   prob: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
  """Masks whole attribute words: int [L] ids -> (masked int32 [L], labels int32 [L]).

  Args:
    token_ids: int [L] caption ids (IRRA layout).
    word_ids: int [L], index of the word each token belongs to, -1 for SOT/EOT/padding.
    is_attribute_word: bool [num_words].
    rng: numpy Generator; consumes num_words + 2L + 1 uniforms per call.
    mask_id / vocab_size_for_random / prob: as in `mlm_mask`; `prob` is per attribute word.

  Each attribute word that has tokens in the caption is selected with `prob`; all its
  candidate tokens (0 < id < mask_id) get the 80/10/10 replacement per token and labels.
  If none is selected, one present attribute word (uniformly chosen) is replaced by
  mask_id entirely. Without any attribute word, IRRA's fallback: position 1 is masked.
  """
  ids = np.asarray(token_ids)
  wids = np.asarray(word_ids)
  attr = np.asarray(is_attribute_word, dtype=bool)
  if ids.ndim != 1 or ids.shape[0] < 2:
    raise ValueError(f"token_ids must have shape [L] with L >= 2, got {ids.shape}.")
  if wids.shape != ids.shape:
    raise ValueError(f"word_ids must have the shape of token_ids {ids.shape}, got {wids.shape}.")
  if attr.ndim != 1:
    raise ValueError(f"is_attribute_word must have shape [num_words], got {attr.shape}.")
  num_words = attr.shape[0]
  if wids.size and (wids.min() < -1 or wids.max() >= num_words):
    raise ValueError(
        f"word_ids must lie in [-1, num_words={num_words}), got range [{wids.min()}, {wids.max()}].")
  hi = _check_args(mask_id, vocab_size_for_random, prob)
  length = ids.shape[0]
  u_word = rng.random(num_words)
  u_tok = rng.random(2 * length)
  u_pick = rng.random()

  ids = ids.astype(np.int64)
  candidate = (ids > 0) & (ids < mask_id) & (wids >= 0)
  safe_wids = np.where(wids >= 0, wids, 0)
  token_is_attr = candidate & attr[safe_wids] if num_words else np.zeros(length, bool)
  present = np.zeros(num_words, bool)
  present[wids[token_is_attr]] = True

  chosen = present & (u_word < prob)
  selected = token_is_attr & chosen[safe_wids] if num_words else token_is_attr
  if selected.any():
    return _replace(ids, selected, u_tok[:length], u_tok[length:], mask_id, hi)
  labels = np.zeros(length, np.int32)
  out = ids.astype(np.int32)
  if present.any():
    options = np.flatnonzero(present)
    word = options[min(int(u_pick * len(options)), len(options) - 1)]
    selected = token_is_attr & (wids == word)
    labels[selected] = ids[selected]
    out[selected] = mask_id
  else:
    labels[1] = ids[1]
    out[1] = mask_id
  return out, labels


# --- attribute words ---------------------------------------------------------


def load_attribute_words(path: str | os.PathLike) -> frozenset[str]:
  """Reads attribute words/phrases, one per line (lowercased; blank and '#' lines skipped)."""
  path = Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"Attribute word file {path} not found: expected a text file, one word per line.") from e
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"Cannot read attribute word file {path} as UTF-8 text: {e}") from e
  words = set()
  for line in text.splitlines():
    line = " ".join(line.split()).lower()
    if line and not line.startswith("#"):
      words.add(line)
  if not words:
    raise ValueError(f"Attribute word file {path} holds no words (expected one word per line).")
  return frozenset(words)


def encode_with_words(tokenizer: Tokenizer,
                      caption: str | bytes) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Tokenizes one caption and tells which word each token belongs to.

  Returns (ids int32 [context_length] as `tokenizer([caption])[0]`, word_ids int32
  [context_length] with the index into `words` per token and -1 for SOT/EOT/padding,
  words: the caption's pre-tokenized words, also those cut off by truncation).
  """
  pieces = tokenizer.encode_words(caption)
  ids: list[int] = []
  owner: list[int] = []
  for w, (_, piece_ids) in enumerate(pieces):
    ids.extend(piece_ids)
    owner.extend([w] * len(piece_ids))
  padded = tokenizer.pad(ids)
  word_ids = np.full((tokenizer.context_length,), -1, np.int32)
  n = min(len(owner), tokenizer.context_length - 2)  # SOT first, EOT last
  word_ids[1:1 + n] = owner[:n]
  return padded, word_ids, [w for w, _ in pieces]


@functools.lru_cache(maxsize=16)
def _attribute_patterns(
    attribute_words: frozenset[str]) -> tuple[frozenset[tuple[str, ...]], tuple[int, ...]]:
  """Pre-tokenized attribute entries and their distinct lengths (cached per word set)."""
  patterns = {tuple(pretokenize(a)) for a in attribute_words}
  patterns.discard(())
  return frozenset(patterns), tuple(sorted({len(p) for p in patterns}))


def attribute_flags(words: Sequence[str], attribute_words: AbstractSet[str]) -> np.ndarray:
  """bool [len(words)]: True for words (pre-tokenized, lowercase) that belong to an attribute entry.

  An entry matches a run of consecutive words equal to its own pre-tokenization, so
  multi-piece entries such as 't-shirt' ('t', '-', 'shirt') or 'high heels' work.
  """
  flags = np.zeros(len(words), bool)
  patterns, by_len = _attribute_patterns(frozenset(attribute_words))
  for k in by_len:
    for start in range(len(words) - k + 1):
      if tuple(words[start:start + k]) in patterns:
        flags[start:start + k] = True
  return flags


def encode_for_attribute_masking(
    tokenizer: Tokenizer, caption: str | bytes,
    attribute_words: AbstractSet[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids [context_length], word_ids [context_length], is_attribute_word [num_words]) for `attribute_mask`."""
  ids, word_ids, words = encode_with_words(tokenizer, caption)
  return ids, word_ids, attribute_flags(words, attribute_words)
