"""Tests for tipr_jax.data.masking: IRRA MLM masking statistics and attribute-word masking."""

from pathlib import Path

import numpy as np
import pytest

from tipr_jax.data import masking
from tipr_jax.data.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
OPENAI_VOCAB = REPO_ROOT.parent / "shared" / "data" / "bpe_simple_vocab_16e6.txt.gz"
MASK, SOT, EOT = 49405, 49406, 49407


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
  assert OPENAI_VOCAB.is_file(), f"test data missing: {OPENAI_VOCAB}"
  return Tokenizer.from_pretrained(OPENAI_VOCAB)


def _captions(n: int, length: int = 77, seed: int = 0) -> np.ndarray:
  """Synthetic IRRA-layout rows: SOT, k ids in 1..49404 (some '<|mask|>' literals), EOT, zeros."""
  rng = np.random.default_rng(seed)
  out = np.zeros((n, length), np.int32)
  for i in range(n):
    k = rng.integers(5, length - 2)
    out[i, 0] = SOT
    out[i, 1:1 + k] = rng.integers(1, MASK, size=k)
    out[i, 1 + k] = EOT
  out[::7, 3] = MASK  # literal mask tokens in the text are not candidates
  return out


def test_mlm_statistics():
  ids = _captions(3000)
  out, labels = masking.mlm_mask_batch(ids, np.random.default_rng(1), mask_id=MASK)
  assert out.dtype == np.int32 and labels.dtype == np.int32 and out.shape == ids.shape
  cand = (ids > 0) & (ids < MASK)
  sel = labels != 0
  assert not (sel & ~cand).any()
  np.testing.assert_array_equal(labels[sel], ids[sel])
  np.testing.assert_array_equal(out[~sel], ids[~sel])  # no row falls back with ~40 candidates
  frac = sel.sum() / cand.sum()
  assert abs(frac - 0.15) < 0.005, frac
  n_sel = sel.sum()
  to_mask = (out[sel] == MASK).sum() / n_sel
  kept = (out[sel] == ids[sel]).sum() / n_sel
  rand = ((out[sel] != MASK) & (out[sel] != ids[sel])).sum() / n_sel
  assert abs(to_mask - 0.8) < 0.015 and abs(kept - 0.1) < 0.01 and abs(rand - 0.1) < 0.01
  assert out[sel].min() >= 1 and out[sel].max() <= MASK


def test_random_tokens_uniform_range():
  # Tiny vocabulary: candidate ids 1..9, mask 10; random ids must cover 1..9 uniformly.
  ids = np.zeros((4000, 40), np.int32)
  ids[:, 0], ids[:, -1] = 12, 11
  ids[:, 1:-1] = 5
  out, labels = masking.mlm_mask_batch(ids, np.random.default_rng(2), mask_id=10, prob=1.0)
  assert (labels[:, 1:-1] == 5).all() and (labels[:, [0, -1]] == 0).all()
  body = out[:, 1:-1]
  # Random draws equal to 5 look "kept"; the other 8 values come only from random replacement.
  counts = np.bincount(body.ravel(), minlength=13)
  assert counts[0] == 0 and (counts[11:] == 0).all()
  others = counts[[1, 2, 3, 4, 6, 7, 8, 9]]
  expected = body.size * 0.1 / 9
  assert np.all(np.abs(others - expected) < 0.1 * expected), others
  assert abs(counts[5] / body.size - (0.1 + 0.1 / 9)) < 0.005
  # vocab_size_for_random restricts the range to 1..vocab_size_for_random-1.
  out3, _ = masking.mlm_mask_batch(ids, np.random.default_rng(3), mask_id=10,
                                   vocab_size_for_random=4, prob=1.0)
  changed = out3[:, 1:-1][(out3[:, 1:-1] != 10) & (out3[:, 1:-1] != 5)]
  assert set(np.unique(changed)) == {1, 2, 3}


def test_position_one_fallback():
  row = np.array([SOT, 320, 2308, 530, EOT, 0, 0], np.int32)
  out, labels = masking.mlm_mask(row, np.random.default_rng(0), mask_id=MASK, prob=1e-12)
  np.testing.assert_array_equal(out, [SOT, MASK, 2308, 530, EOT, 0, 0])
  np.testing.assert_array_equal(labels, [0, 320, 0, 0, 0, 0, 0])
  # Empty caption: IRRA still masks position 1, i.e. the EOT token (label 49407).
  empty = np.array([SOT, EOT, 0, 0], np.int32)
  out, labels = masking.mlm_mask(empty, np.random.default_rng(0), mask_id=MASK)
  np.testing.assert_array_equal(out, [SOT, MASK, 0, 0])
  np.testing.assert_array_equal(labels, [0, EOT, 0, 0])


def test_determinism_and_batch_equals_rows():
  ids = _captions(16, seed=5)
  a = masking.mlm_mask_batch(ids, np.random.default_rng(7), mask_id=MASK)
  b = masking.mlm_mask_batch(ids, np.random.default_rng(7), mask_id=MASK)
  c = masking.mlm_mask_batch(ids, np.random.default_rng(8), mask_id=MASK)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  rng = np.random.default_rng(7)
  rows = [masking.mlm_mask(r, rng, mask_id=MASK) for r in ids]
  np.testing.assert_array_equal(np.stack([r[0] for r in rows]), a[0])
  np.testing.assert_array_equal(np.stack([r[1] for r in rows]), a[1])
  ids_copy = ids.copy()
  masking.mlm_mask(ids[0], np.random.default_rng(0), mask_id=MASK)
  np.testing.assert_array_equal(ids, ids_copy)  # no in-place writes


def test_mlm_bad_input():
  with pytest.raises(ValueError, match="shape"):
    masking.mlm_mask(np.zeros((2, 3), np.int32), np.random.default_rng(0), mask_id=MASK)
  with pytest.raises(ValueError, match="vocab_size_for_random"):
    masking.mlm_mask(np.zeros(5, np.int32), np.random.default_rng(0), mask_id=MASK,
                     vocab_size_for_random=MASK + 1)
  with pytest.raises(ValueError, match="prob"):
    masking.mlm_mask(np.zeros(5, np.int32), np.random.default_rng(0), mask_id=MASK, prob=0.0)


# --- attribute words -----------------------------------------------------------

CAPTION = "A woman with a Red jekyll bag, a white t-shirt and the black high heels."
ATTRS = frozenset({"red", "jekyll", "t-shirt", "high heels"})


def test_load_attribute_words(tmp_path):
  f = tmp_path / "attrs.txt"
  f.write_text("# colours\nRed\n\n  high   HEELS \nt-shirt\n", encoding="utf-8")
  assert masking.load_attribute_words(f) == frozenset({"red", "high heels", "t-shirt"})
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    masking.load_attribute_words(tmp_path / "missing.txt")
  (tmp_path / "empty.txt").write_text("# nothing\n")
  with pytest.raises(ValueError, match="empty.txt"):
    masking.load_attribute_words(tmp_path / "empty.txt")


def test_encode_with_words(tok):
  ids, word_ids, words = masking.encode_with_words(tok, CAPTION)
  np.testing.assert_array_equal(ids, tok([CAPTION])[0])
  assert ids.dtype == np.int32 and word_ids.dtype == np.int32 and ids.shape == word_ids.shape == (77,)
  assert words == ["a", "woman", "with", "a", "red", "jekyll", "bag", ",", "a", "white", "t", "-",
                   "shirt", "and", "the", "black", "high", "heels", "."]
  n = int(np.argmax(ids == EOT))
  assert word_ids[0] == -1 and (word_ids[n:] == -1).all() and (word_ids[1:n] >= 0).all()
  for w, word in enumerate(words):
    np.testing.assert_array_equal(ids[word_ids == w], tok.encode(word))
  flags = masking.attribute_flags(words, ATTRS)
  assert [words[i] for i in np.flatnonzero(flags)] == ["red", "jekyll", "t", "-", "shirt", "high",
                                                         "heels"]
  # Truncation: the forced EOT position belongs to no word.
  ids, word_ids, words = masking.encode_with_words(tok, "red " * 90)
  assert len(words) == 90 and word_ids[76] == -1 and ids[76] == EOT
  np.testing.assert_array_equal(word_ids[1:76], np.arange(75))


def test_attribute_mask_only_attribute_tokens(tok):
  ids, word_ids, flags = masking.encode_for_attribute_masking(tok, CAPTION, ATTRS)
  jekyll = flags.nonzero()[0][1]
  assert (word_ids == jekyll).sum() > 1  # a multi-token attribute word
  attr_tok = (word_ids >= 0) & flags[np.maximum(word_ids, 0)]
  rng = np.random.default_rng(0)
  word_hits = np.zeros(len(flags))
  n_draws = 4000
  for _ in range(n_draws):
    out, labels = masking.attribute_mask(ids, word_ids, flags, rng, mask_id=MASK, prob=0.3)
    sel = labels != 0
    assert sel.any() and not (sel & ~attr_tok).any()
    np.testing.assert_array_equal(labels[sel], ids[sel])
    np.testing.assert_array_equal(out[~sel], ids[~sel])
    for w in np.unique(word_ids[sel]):  # all tokens of a selected word are selected
      assert sel[word_ids == w].all()
      word_hits[w] += 1
  # P(word masked) = p + P(no word selected) / k, with k = 7 attribute words.
  k = flags.sum()
  expected = 0.3 + 0.7 ** k / k
  np.testing.assert_allclose(word_hits[flags] / n_draws, expected, atol=0.03)
  assert (word_hits[~flags] == 0).all()


def test_attribute_replacement_statistics(tok):
  ids, word_ids, flags = masking.encode_for_attribute_masking(tok, CAPTION, ATTRS)
  rng = np.random.default_rng(3)
  outs, labels = zip(*[masking.attribute_mask(ids, word_ids, flags, rng, mask_id=MASK, prob=1.0)
                       for _ in range(3000)])
  outs, labels = np.stack(outs), np.stack(labels)
  sel = labels != 0
  n_attr_tokens = ((word_ids >= 0) & flags[np.maximum(word_ids, 0)]).sum()
  assert (sel.sum(axis=1) == n_attr_tokens).all()
  orig = np.broadcast_to(ids, outs.shape)
  n = sel.sum()
  assert abs((outs[sel] == MASK).sum() / n - 0.8) < 0.015
  assert abs((outs[sel] == orig[sel]).sum() / n - 0.1) < 0.01


def test_attribute_fallbacks(tok):
  ids, word_ids, flags = masking.encode_for_attribute_masking(tok, CAPTION, ATTRS)
  rng = np.random.default_rng(4)
  chosen = set()
  for _ in range(300):  # nothing selected -> one whole attribute word, replaced by the mask
    out, labels = masking.attribute_mask(ids, word_ids, flags, rng, mask_id=MASK, prob=1e-12)
    words_hit = np.unique(word_ids[labels != 0])
    assert len(words_hit) == 1 and flags[words_hit[0]]
    assert (out[word_ids == words_hit[0]] == MASK).all()
    chosen.add(int(words_hit[0]))
  assert chosen == set(np.flatnonzero(flags).tolist())
  # No attribute word at all -> IRRA rule at position 1.
  none = np.zeros_like(flags)
  out, labels = masking.attribute_mask(ids, word_ids, none, rng, mask_id=MASK)
  assert out[1] == MASK and labels[1] == ids[1] and (labels[2:] == 0).all()
  np.testing.assert_array_equal(out[2:], ids[2:])


def test_attribute_determinism_and_errors(tok):
  ids, word_ids, flags = masking.encode_for_attribute_masking(tok, CAPTION, ATTRS)
  a = masking.attribute_mask(ids, word_ids, flags, np.random.default_rng(9), mask_id=MASK)
  b = masking.attribute_mask(ids, word_ids, flags, np.random.default_rng(9), mask_id=MASK)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  with pytest.raises(ValueError, match="word_ids"):
    masking.attribute_mask(ids, word_ids[:10], flags, np.random.default_rng(0), mask_id=MASK)
  with pytest.raises(ValueError, match="num_words"):
    masking.attribute_mask(ids, word_ids, flags[:3], np.random.default_rng(0), mask_id=MASK)
