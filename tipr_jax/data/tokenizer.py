"""CLIP byte-level BPE tokenizer with IRRA's special-token layout.

Layout of the vocabulary (ids in this order):
  256 byte symbols, 256 byte symbols + '</w>', the merged tokens of the first
  `m - 1` merges, then '<|mask|>', '<|startoftext|>', '<|endoftext|>'.
Here `m = min(#merge lines, 48894)`: like IRRA, the merges file is read up to
line 48894 and the token of the last merge read is dropped, so that its id is
reused by '<|mask|>'. For the OpenAI file this gives mask 49405, sot 49406,
eot 49407, vocab 49408; the padding id is 0.

The dropped merge is also not applied when encoding (IRRA keeps it in its
merge ranks and then fails with a KeyError on words such as 'jekyll'; here such
words split into the pieces of the earlier merges instead). All other words get
IRRA's ids.

`build_bpe_vocab` learns merges from a caption corpus and writes a file in the
same `.txt.gz` format. It writes the learned merges plus one sentinel merge
('ÿ ÿ', bytes 0xFF 0xFF, which never occur in UTF-8 text) as the last line, so
that the loader's "drop the last merge" rule removes the sentinel and every
learned merge survives.
"""

from __future__ import annotations

import collections
import functools
import gzip
import heapq
import html
import io
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import numpy as np
import regex

MASK_TOKEN = "<|mask|>"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (MASK_TOKEN, SOT_TOKEN, EOT_TOKEN)
# IRRA reads lines[1:49152 - 256 - 2 + 1] of the merges file: at most 48894 merges.
MAX_MERGES = 49152 - 256 - 2
DEFAULT_CONTEXT_LENGTH = 77
OPENAI_VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
BUILT_VOCAB_NAME = "bpe_vocab.txt.gz"
# Last merge line written by build_bpe_vocab; dropped by the loader.
_SENTINEL_MERGE = ("\u00ff", "\u00ff")
_END_OF_WORD = "</w>"

# CLIP's pre-tokenizer, plus '<|mask|>' (as in IRRA).
_PRETOKENIZE_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|<\|mask\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE_RE = regex.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
  """Maps each byte 0..255 to a printable unicode character (GPT-2/CLIP scheme).

  Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ')
  map to themselves; the remaining 68 bytes map, in increasing byte order, to
  chr(256), chr(257), ... The dict's insertion order is the vocabulary order:
  the printable bytes first (ascending), then the others (ascending).
  """
  printable = (list(range(ord("!"), ord("~") + 1))
               + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def clean_text(text: str) -> str:
  """IRRA/CLIP text cleaning: ftfy, html-unescape twice, strip, collapse spaces, lowercase."""
  if text.isascii() and text.isprintable() and "&" not in text:
    # Fast path (same result): ftfy and html.unescape leave printable ASCII without '&'
    # unchanged, and the only whitespace in it is ' '.
    return " ".join(text.split()).lower()
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return _WHITESPACE_RE.sub(" ", text).strip().lower()


def pretokenize(text: str) -> list[str]:
  """Cleans `text` and splits it into CLIP's pre-tokenized words (BPE works per word)."""
  return _PRETOKENIZE_RE.findall(clean_text(text))


def _as_str(text: str | bytes) -> str:
  if isinstance(text, bytes):
    return text.decode("utf-8")
  if not isinstance(text, str):
    raise TypeError(f"Expected a caption as str or bytes, got {type(text).__name__}.")
  return text


def _read_text(path: Path) -> str:
  """Reads a (possibly gzip-compressed) UTF-8 text file."""
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise FileNotFoundError(f"Cannot read BPE vocabulary file {path}: {e}") from e
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise ValueError(f"BPE vocabulary file {path} is not a valid gzip file: {e}") from e
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"BPE vocabulary file {path} is not UTF-8 text: {e}") from e


def _parse_merges(text: str, path: Path) -> list[tuple[str, str]]:
  """Parses a merges file: a '#version' header line, then 'a b' lines (at most MAX_MERGES read)."""
  lines = text.split("\n")
  if not lines or "#version" not in lines[0]:
    raise ValueError(
        f"BPE merges file {path}: expected a first header line containing '#version' "
        f"(OpenAI bpe_simple_vocab / Hugging Face merges.txt format), got {lines[0][:60]!r}.")
  merges = []
  for lineno, line in enumerate(lines[1:MAX_MERGES + 1], start=2):
    if not line.strip():
      if all(not rest.strip() for rest in lines[lineno - 1:MAX_MERGES + 1]):
        break  # trailing blank lines
      raise ValueError(f"BPE merges file {path}: blank line {lineno} before the end of the merges.")
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"BPE merges file {path}, line {lineno}: expected 'a b', got {line!r}.")
    merges.append((parts[0], parts[1]))
  if not merges:
    raise ValueError(f"BPE merges file {path}: expected at least one merge line after the header.")
  return merges


def _find_vocab(path: Path) -> tuple[str, Path]:
  """Resolves `path` to ('hf', dir) or ('merges', file)."""
  if path.is_dir():
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
      return "hf", path
    if (path / OPENAI_VOCAB_NAME).is_file():
      return "merges", path / OPENAI_VOCAB_NAME
    candidates = sorted(path.glob("*.txt.gz"))
    if len(candidates) == 1:
      return "merges", candidates[0]
    if len(candidates) > 1:
      raise ValueError(
          f"Directory {path} holds several .txt.gz files ({', '.join(c.name for c in candidates)}); "
          f"expected exactly one BPE vocabulary, or pass the file path.")
    raise FileNotFoundError(
        f"Directory {path} has no BPE vocabulary: expected vocab.json + merges.txt (Hugging Face "
        f"CLIP) or a {OPENAI_VOCAB_NAME}-style .txt.gz file.")
  if path.is_file():
    return "merges", path
  raise FileNotFoundError(
      f"BPE vocabulary path {path} does not exist: expected a Hugging Face CLIP directory "
      f"(vocab.json + merges.txt), an OpenAI {OPENAI_VOCAB_NAME} file, a directory holding one, "
      f"or a file written by build_bpe_vocab.")


class Tokenizer:
  """CLIP BPE tokenizer, IRRA layout. `tok(captions) -> int32 [N, context_length]`."""

  def __init__(self, merges: Sequence[tuple[str, str]],
               context_length: int = DEFAULT_CONTEXT_LENGTH):
    """Builds the vocabulary from merge pairs (all of them are read; the last is dropped).

    Args:
      merges: merge pairs in rank order, already capped at MAX_MERGES by the caller.
      context_length: length of the arrays returned by `__call__` (>= 2).
    """
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}.")
    if not merges:
      raise ValueError("Tokenizer needs at least one merge (the last one is dropped).")
    kept = [tuple(m) for m in merges[:-1]]
    byte_syms = list(byte_encoder().values())
    vocab = byte_syms + [s + _END_OF_WORD for s in byte_syms] + ["".join(m) for m in kept]
    vocab += list(SPECIAL_TOKENS)
    self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
    if len(self.encoder) != len(vocab):
      dup = [t for t, c in collections.Counter(vocab).items() if c > 1][:5]
      raise ValueError(f"BPE merges produce duplicate tokens, e.g. {dup}.")
    for a, b in merges:
      if a not in self.encoder or b not in self.encoder:
        raise ValueError(f"BPE merge {a!r} {b!r} uses a symbol that is not a byte token or an "
                         f"earlier merge's token.")
    self.decoder: list[str] = vocab
    self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(kept)}
    self.vocab_size: int = len(vocab)
    self.pad_id: int = 0
    self.mask_id: int = self.encoder[MASK_TOKEN]
    self.sot_id: int = self.encoder[SOT_TOKEN]
    self.eot_id: int = self.encoder[EOT_TOKEN]
    self.context_length: int = int(context_length)
    self._byte_enc = byte_encoder()
    self._byte_dec = {c: b for b, c in self._byte_enc.items()}
    # Word (pre-tokenized piece, unencoded) -> token ids. Specials map to themselves.
    self._cache: dict[str, tuple[int, ...]] = {t: (self.encoder[t],) for t in SPECIAL_TOKENS}

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike,
                      context_length: int = DEFAULT_CONTEXT_LENGTH) -> "Tokenizer":
    """Loads a HF CLIP dir (vocab.json + merges.txt), an OpenAI .txt.gz, a dir holding one,
    or a `build_bpe_vocab` file."""
    path = Path(path)
    kind, where = _find_vocab(path)
    if kind == "merges":
      return cls(_parse_merges(_read_text(where), where), context_length)
    merges_path, vocab_path = where / "merges.txt", where / "vocab.json"
    tok = cls(_parse_merges(_read_text(merges_path), merges_path), context_length)
    try:
      hf_vocab = json.loads(_read_text(vocab_path))
    except json.JSONDecodeError as e:
      raise ValueError(f"{vocab_path} is not valid JSON: {e}") from e
    if not isinstance(hf_vocab, dict):
      raise ValueError(f"{vocab_path}: expected a JSON object token -> id.")
    tok._check_hf_vocab(hf_vocab, vocab_path)
    return tok

  def _check_hf_vocab(self, hf_vocab: dict[str, int], vocab_path: Path) -> None:
    """Checks that vocab.json assigns our ids (its id `mask_id` holds the dropped merge)."""
    for token in (SOT_TOKEN, EOT_TOKEN):
      if hf_vocab.get(token) != self.encoder[token]:
        raise ValueError(
            f"{vocab_path}: expected {token} at id {self.encoder[token]} (CLIP layout), "
            f"got {hf_vocab.get(token)}.")
    for token, idx in hf_vocab.items():
      if not isinstance(idx, int):
        raise ValueError(f"{vocab_path}: expected integer ids, got {token!r}: {idx!r}.")
      if idx < self.mask_id and self.decoder[idx] != token:
        raise ValueError(
            f"{vocab_path}: id {idx} is {token!r} but merges.txt gives {self.decoder[idx]!r}; "
            f"expected the CLIP layout (bytes, bytes</w>, merges, specials).")
    if len(hf_vocab) != self.vocab_size:
      raise ValueError(
          f"{vocab_path}: expected {self.vocab_size} entries for its merges.txt, got {len(hf_vocab)}.")

  # --- BPE -----------------------------------------------------------------

  def _bpe(self, symbols: list[str]) -> list[str]:
    """Applies merges by rank (lowest first, all occurrences left to right) to one word."""
    ranks = self.bpe_ranks
    while len(symbols) > 1:
      best, best_rank = None, None
      for pair in zip(symbols, symbols[1:]):
        r = ranks.get(pair)
        if r is not None and (best_rank is None or r < best_rank):
          best, best_rank = pair, r
      if best is None:
        break
      first, second = best
      merged, i, n = [], 0, len(symbols)
      while i < n:
        if i < n - 1 and symbols[i] == first and symbols[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    return symbols

  def _word_ids(self, word: str) -> tuple[int, ...]:
    """Token ids of one pre-tokenized word (cached)."""
    ids = self._cache.get(word)
    if ids is None:
      enc = self._byte_enc
      chars = [enc[b] for b in word.encode("utf-8")]
      chars[-1] += _END_OF_WORD
      ids = tuple(self.encoder[s] for s in self._bpe(chars))
      self._cache[word] = ids
    return ids

  # --- public API ----------------------------------------------------------

  def encode(self, text: str | bytes) -> list[int]:
    """Cleaned BPE ids of `text`, without SOT/EOT."""
    out: list[int] = []
    for word in _PRETOKENIZE_RE.findall(clean_text(_as_str(text))):
      out.extend(self._word_ids(word))
    return out

  def encode_words(self, text: str | bytes) -> list[tuple[str, tuple[int, ...]]]:
    """(word, token ids) per pre-tokenized word of the cleaned text; ids concatenate to encode(text).

    CLIP BPE works per word, so a word's ids do not depend on its context.
    """
    return [(w, self._word_ids(w)) for w in _PRETOKENIZE_RE.findall(clean_text(_as_str(text)))]

  def word_spans(self, text: str | bytes) -> list[tuple[str, int, int]]:
    """(word, start, end) per pre-tokenized word: encode(text)[start:end] are its tokens."""
    spans, pos = [], 0
    for word, ids in self.encode_words(text):
      spans.append((word, pos, pos + len(ids)))
      pos += len(ids)
    return spans

  def decode(self, ids: Iterable[int]) -> str:
    """Text of token ids ('</w>' becomes a space; trailing space removed)."""
    pieces = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"Token id {i} out of range [0, {self.vocab_size}).")
      pieces.append(self.decoder[i])
    text = "".join(pieces)
    data = bytearray()
    for c in text:
      b = self._byte_dec.get(c)
      if b is None:  # only reachable for characters outside the byte alphabet
        data.extend(c.encode("utf-8"))
      else:
        data.append(b)
    # '</w>' consists of byte symbols, so it survives the byte decoding as text.
    return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").rstrip()

  def pad(self, ids: Sequence[int]) -> np.ndarray:
    """[SOT] + ids + [EOT], truncated (last forced to EOT) or zero-padded: int32 [context_length]."""
    seq = [self.sot_id, *ids, self.eot_id]
    out = np.zeros((self.context_length,), np.int32)
    if len(seq) > self.context_length:
      seq = seq[:self.context_length]
      seq[-1] = self.eot_id
    out[:len(seq)] = seq
    return out

  def __call__(self, captions: Sequence[str | bytes]) -> np.ndarray:
    """Tokenizes captions to int32 [N, context_length] (IRRA layout, zero padded)."""
    if isinstance(captions, (str, bytes)):
      raise TypeError("Tokenizer expects a sequence of captions; wrap a single caption as [text].")
    out = np.zeros((len(captions), self.context_length), np.int32)
    for row, caption in enumerate(captions):
      out[row] = self.pad(self.encode(caption))
    return out

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, mask_id={self.mask_id}, sot_id={self.sot_id}, "
            f"eot_id={self.eot_id}, context_length={self.context_length})")


# --- BPE learning ------------------------------------------------------------


def _learn_merges(word_counts: dict[str, int], num_merges: int) -> list[tuple[str, str]]:
  """Learns up to `num_merges` merges from word frequencies with incremental pair counts.

  The most frequent pair is merged first; ties go to the lexicographically smallest
  (first, second) pair, so the result only depends on the word counts.
  """
  enc = byte_encoder()
  words: list[list[str]] = []
  freqs: list[int] = []
  for word in sorted(word_counts):
    chars = [enc[b] for b in word.encode("utf-8")]
    chars[-1] += _END_OF_WORD
    words.append(chars)
    freqs.append(word_counts[word])

  counts: dict[tuple[str, str], int] = collections.defaultdict(int)
  where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
  for idx, (syms, f) in enumerate(zip(words, freqs)):
    for pair in zip(syms, syms[1:]):
      counts[pair] += f
      where[pair].add(idx)
  heap = [(-c, p) for p, c in counts.items()]
  heapq.heapify(heap)

  merges: list[tuple[str, str]] = []
  while len(merges) < num_merges and heap:
    neg, pair = heapq.heappop(heap)
    if counts.get(pair, 0) != -neg or neg == 0:
      continue  # stale entry
    merges.append(pair)
    first, second = pair
    joined = first + second
    changed = set()
    for idx in sorted(where.pop(pair)):
      syms, f = words[idx], freqs[idx]
      new, i, n = [], 0, len(syms)
      while i < n:
        if i < n - 1 and syms[i] == first and syms[i + 1] == second:
          new.append(joined)
          i += 2
        else:
          new.append(syms[i])
          i += 1
      old_pairs = list(zip(syms, syms[1:]))
      new_pairs = list(zip(new, new[1:]))
      for p in old_pairs:
        counts[p] -= f
        changed.add(p)
      for p in new_pairs:
        counts[p] += f
        changed.add(p)
      for p in set(old_pairs) - set(new_pairs):
        if p != pair:
          where[p].discard(idx)
      for p in new_pairs:
        where[p].add(idx)
      words[idx] = new
    counts.pop(pair, None)
    changed.discard(pair)
    for p in sorted(changed):
      c = counts[p]
      if c > 0:
        heapq.heappush(heap, (-c, p))
      else:
        counts.pop(p, None)
        where.pop(p, None)
  return merges


def build_bpe_vocab(captions: Iterable[str | bytes], num_merges: int,
                    out_path: str | os.PathLike) -> Path:
  """Learns byte-level BPE merges from captions and writes a bpe_simple_vocab-style .txt.gz.

  The file holds a '#version' header, the learned merges (at most `num_merges`; fewer
  if the corpus runs out of pairs) and one sentinel merge that the loader drops, so
  `Tokenizer.from_pretrained(out)` has vocab_size = 512 + #learned + 3 with mask, sot, eot
  as the last three ids. Output bytes are deterministic for the same captions.
  If `out_path` is an existing directory, writes `<dir>/bpe_vocab.txt.gz`. Returns the path.
  """
  if not 0 <= num_merges <= MAX_MERGES - 1:
    raise ValueError(f"num_merges must be in [0, {MAX_MERGES - 1}], got {num_merges}.")
  out_path = Path(out_path)
  if out_path.is_dir():
    out_path = out_path / BUILT_VOCAB_NAME
  word_counts: collections.Counter[str] = collections.Counter()
  for caption in captions:
    word_counts.update(
        w for w in pretokenize(_as_str(caption)) if w not in SPECIAL_TOKENS)
  merges = _learn_merges(word_counts, num_merges)
  lines = ["#version: 0.2 (tipr_jax build_bpe_vocab; last line is a sentinel dropped on load)"]
  lines += [f"{a} {b}" for a, b in merges]
  lines.append(" ".join(_SENTINEL_MERGE))
  payload = ("\n".join(lines) + "\n").encode("utf-8")
  buf = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
    gz.write(payload)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_bytes(buf.getvalue())
  return out_path
