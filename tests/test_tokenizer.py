"""Tests for tipr_jax.data.tokenizer: IRRA ids, HF parity, loading paths, BPE builder."""

import gzip
import html
import json
import pickle
import random
import shutil
import time
from pathlib import Path

import ftfy
import numpy as np
import pytest
import regex

from tipr_jax.data.tokenizer import Tokenizer, build_bpe_vocab, clean_text

REPO_ROOT = Path(__file__).resolve().parents[1]
OPENAI_VOCAB = REPO_ROOT.parent / "shared" / "data" / "bpe_simple_vocab_16e6.txt.gz"

KNOWN_CAPTION = "A woman in a red shirt, black pants and white shoes."
KNOWN_IDS = [49406, 320, 2308, 530, 320, 736, 2523, 267, 1449, 5003, 537, 1579, 4079, 269, 49407]

CAPTIONS = [
    KNOWN_CAPTION,
    "  The MAN   wears a   Jacket!!! (size 42)  ",
    "Café crème, naïve façade — “quoted” ‘single’ ½",
    "emoji 😀👍🏽 and CJK 北京大学 日本語 한국어",
    "Tom &amp; Jerry &lt;b&gt; &quot;x&quot; &#39;y&#39; &amp;amp; done",
    "she's wearing they're we've I'm you'll he'd",
    "123 4567 3.14 1,000 #hashtag @user_name",
    "tabs\tand\nnewlines\r\nmixed",
    "Ｆｕｌｌｗｉｄｔｈ ligature ﬁne",
    "Ça va? ÀÉÎÕÜ ß ø å",
    "a " * 100,
    "",
]


def _hf_byte_symbols() -> list[str]:
  """Independent re-derivation of the GPT-2/CLIP byte alphabet, in vocabulary order."""
  keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
  rest = [b for b in range(256) if b not in keep]
  return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
  assert OPENAI_VOCAB.is_file(), f"test data missing: {OPENAI_VOCAB}"
  return Tokenizer.from_pretrained(OPENAI_VOCAB)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
  """Writes vocab.json + merges.txt in Hugging Face's CLIP format from the OpenAI file."""
  lines = gzip.decompress(OPENAI_VOCAB.read_bytes()).decode("utf-8").split("\n")
  merges = lines[1:48895]
  syms = _hf_byte_symbols()
  vocab = syms + [s + "</w>" for s in syms] + ["".join(m.split()) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  d = tmp_path_factory.mktemp("hf_clip")
  (d / "vocab.json").write_text(
      json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
  (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
  return d


def test_known_value(tok):
  out = tok([KNOWN_CAPTION])
  expected = np.zeros((1, 77), np.int32)
  expected[0, :len(KNOWN_IDS)] = KNOWN_IDS
  assert out.dtype == np.int32 and out.shape == (1, 77)
  np.testing.assert_array_equal(out, expected)


def test_layout(tok):
  assert (tok.vocab_size, tok.pad_id, tok.mask_id, tok.sot_id, tok.eot_id) == (
      49408, 0, 49405, 49406, 49407)
  assert tok.context_length == 77
  assert tok.decoder[0] == "!" and tok.decoder[256] == "!</w>" and tok.decoder[512] == "in"
  assert tok.decoder[49404] == "ðŁĴĳ</w>"  # last kept merge (line 48894 of the file)
  assert tok.decoder[49405:] == ["<|mask|>", "<|startoftext|>", "<|endoftext|>"]
  assert tok.encode("a <|mask|> b") == [320, 49405, 321]  # byte+</w> ids: 256 + ord - 33
  assert tok.encode("<|startoftext|>x<|endoftext|>") == [49406, 343, 49407]


def _hf_input(text: str) -> str:
  """Reference cleaning that HF's fast tokenizer lacks: ftfy + double html.unescape."""
  return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def test_matches_transformers_clip_tokenizer(tok, hf_dir):
  from transformers import CLIPTokenizer
  hf = CLIPTokenizer.from_pretrained(str(hf_dir))
  for caption in CAPTIONS:
    ours = tok.encode(caption)
    theirs = hf(_hf_input(caption), add_special_tokens=False)["input_ids"]
    assert ours == theirs, caption
  # The known caption agrees on the full (unpadded) sequence with specials as well.
  assert hf(KNOWN_CAPTION)["input_ids"] == KNOWN_IDS


def test_hf_directory_same_ids(tok, hf_dir):
  from_hf = Tokenizer.from_pretrained(hf_dir)
  assert from_hf.decoder == tok.decoder
  assert (from_hf.mask_id, from_hf.sot_id, from_hf.eot_id) == (49405, 49406, 49407)
  np.testing.assert_array_equal(from_hf(CAPTIONS), tok(CAPTIONS))


def test_hf_directory_inconsistent_vocab(hf_dir, tmp_path):
  bad = tmp_path / "bad_hf"
  shutil.copytree(hf_dir, bad)
  vocab = json.loads((bad / "vocab.json").read_text(encoding="utf-8"))
  vocab["in"], vocab["th"] = vocab["th"], vocab["in"]
  (bad / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  with pytest.raises(ValueError, match="vocab.json"):
    Tokenizer.from_pretrained(bad)


def test_directory_with_txt_gz(tok, tmp_path):
  shutil.copy(OPENAI_VOCAB, tmp_path / OPENAI_VOCAB.name)
  (tmp_path / "other.json").write_text("{}")
  in_dir = Tokenizer.from_pretrained(tmp_path, context_length=32)
  assert in_dir.context_length == 32
  np.testing.assert_array_equal(in_dir([KNOWN_CAPTION]), tok([KNOWN_CAPTION])[:, :32])


def test_cleaning_equivalences(tok):
  base = tok.encode("a man in a black & white coat")
  assert tok.encode("A MAN In a BLACK &amp; White COAT") == base
  assert tok.encode("  a\tman \n\n in a   black &amp;amp; white coat  ") == base
  assert tok.encode("a man in a black &#38; white coat") == base
  assert tok.encode("a man in a black &amp;amp;amp; white coat") == base
  # With a literal '<' ftfy leaves entities alone; the two html.unescape passes still apply.
  assert tok.encode("<b> black &amp;amp; white") == tok.encode("<b> black & white")
  assert tok.decode(tok.encode("<b> black &amp;amp;amp; white")) == "< b > black & amp ; white"


def test_clean_text_fast_path_matches_reference_cleaning():
  def reference(text):
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()
  rng = random.Random(0)
  alphabet = [chr(c) for c in range(32, 127)] + ["\t", "\n", "é", "’", "ﬁ", "😀"]
  weights = [1.0] * 95 + [0.2] * 6
  for _ in range(3000):
    text = "".join(rng.choices(alphabet, weights, k=rng.randint(0, 30)))
    assert clean_text(text) == reference(text), repr(text)


def test_truncation(tok):
  long = "red " * 100
  out = tok([long, "word " * 75, "word " * 76])
  assert out[0, -1] == 49407 and out[0, 0] == 49406
  np.testing.assert_array_equal(out[0, 1:76], np.full(75, tok.encode("red")[0]))
  # 75 words fit exactly (SOT + 75 + EOT = 77); 76 are cut, last forced to EOT.
  assert out[1, 76] == 49407 and out[1, 75] != 49407
  assert out[2, 76] == 49407 and (out[2] == 49407).sum() == 1


def test_word_spans_context_free(tok):
  text = "A t-shirt, the women's JEANS!!"
  ids = tok.encode(text)
  spans = tok.word_spans(text)
  assert [w for w, _, _ in spans] == ["a", "t", "-", "shirt", ",", "the", "women", "'s", "jeans", "!!"]
  assert spans[-1][2] == len(ids)
  for word, start, end in spans:
    assert ids[start:end] == tok.encode(word)


def test_decode_round_trip(tok):
  assert tok.decode(tok.encode(KNOWN_CAPTION)) == "a woman in a red shirt , black pants and white shoes ."
  text = "café 😀 北京 naïve"
  assert tok.decode(tok.encode(text)) == text
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([49408])


def test_pickle_round_trip(tok):
  # Grain worker processes receive the tokenizer by pickling.
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone(CAPTIONS), tok(CAPTIONS))
  assert clone.mask_id == tok.mask_id and clone.context_length == tok.context_length


def test_popped_merge_not_emitted(tok):
  # IRRA drops the token of the last merge ('jeky ll</w>'); that id is the mask now.
  ids = tok.encode("jekyll")
  assert 49405 not in ids and len(ids) > 1
  assert tok.decode(ids) == "jekyll"


def test_bad_paths(tmp_path):
  missing = tmp_path / "nope.txt.gz"
  with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
    Tokenizer.from_pretrained(missing)
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    Tokenizer.from_pretrained(tmp_path)
  no_header = tmp_path / "x.txt"
  no_header.write_text("i n\nt h\n")
  with pytest.raises(ValueError, match="x.txt.*#version"):
    Tokenizer.from_pretrained(no_header)
  bad_line = tmp_path / "y.txt"
  bad_line.write_text("#version: 0.2\ni n\nthree parts here\n")
  with pytest.raises(ValueError, match="line 3"):
    Tokenizer.from_pretrained(bad_line)
  unknown = tmp_path / "z.txt"
  unknown.write_text("#version: 0.2\ni n\nxyz q\nt h\n")
  with pytest.raises(ValueError, match="xyz"):
    Tokenizer.from_pretrained(unknown)
  with pytest.raises(TypeError):
    Tokenizer.from_pretrained(OPENAI_VOCAB)("a single string")


# --- build_bpe_vocab -----------------------------------------------------------

TOY = ["low " * 5 + "lower " * 2 + "newest " * 6 + "widest " * 3]
# Hand-derived: most frequent pair first, ties to the lexicographically smallest pair.
TOY_MERGES = ["e s", "es t</w>", "l o", "e w", "ew est</w>", "n ewest</w>", "lo w</w>"]


def test_build_hand_computed(tmp_path):
  path = build_bpe_vocab(TOY, 7, tmp_path / "toy.txt.gz")
  lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
  assert "#version" in lines[0]
  assert lines[1:8] == TOY_MERGES
  assert lines[8] == "\u00ff \u00ff" and lines[9:] == [""]  # sentinel, dropped by the loader
  tok = Tokenizer.from_pretrained(path)
  assert tok.vocab_size == 512 + 7 + 3
  assert (tok.mask_id, tok.sot_id, tok.eot_id) == (519, 520, 521)
  assert tok.encode("newest") == [512 + 5]
  assert tok.encode("lowest") == [512 + 2, tok.encode("w")[0] - 256, 512 + 1]
  assert tok.encode("low") == [512 + 6]


def _corpus(n: int, seed: int) -> list[str]:
  rng = random.Random(seed)
  letters = "abcdefghijklmnopqrstuvwxyz"
  vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(3000)]
  return [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 15))) + rng.choice(".!,")
          for _ in range(n)]


def test_build_round_trip_and_determinism(tmp_path):
  captions = _corpus(2000, 0) + ["Café 😀 北京 &amp; 42 T-Shirt"]
  a = build_bpe_vocab(captions, 300, tmp_path / "a.txt.gz")
  b = build_bpe_vocab(list(captions), 300, tmp_path / "b.txt.gz")
  c = build_bpe_vocab(captions[1:], 300, tmp_path / "c.txt.gz")
  assert a.read_bytes() == b.read_bytes()
  assert a.read_bytes() != c.read_bytes()
  tok = Tokenizer.from_pretrained(a)
  assert tok.vocab_size == 512 + 300 + 3
  assert [tok.mask_id, tok.sot_id, tok.eot_id] == [tok.vocab_size - 3, tok.vocab_size - 2,
                                                    tok.vocab_size - 1]
  assert tok.decoder[-3:] == ["<|mask|>", "<|startoftext|>", "<|endoftext|>"]
  for caption in captions[:200]:
    ids = tok.encode(caption)
    assert all(0 <= i < tok.mask_id for i in ids)
    assert tok.decode(ids) == " ".join(w for w, _, _ in tok.word_spans(caption))
  assert tok.decode(tok.encode("café 😀 北京")) == "café 😀 北京"
  # Merges shorten the corpus: clearly fewer tokens than bytes (one token per byte without merges).
  n_bytes = sum(len(w.encode()) for c in captions[:200] for w, _, _ in tok.word_spans(c))
  assert sum(len(tok.encode(c)) for c in captions[:200]) < 0.85 * n_bytes
  out = tok(captions[:3])
  assert out.shape == (3, 77) and (out[:, 0] == tok.sot_id).all()
  # A directory holding the built file loads too.
  d = tmp_path / "ds"
  d.mkdir()
  built = build_bpe_vocab(captions, 300, d)
  assert built.parent == d
  assert Tokenizer.from_pretrained(d).decoder == tok.decoder


def test_build_exhausted_corpus_and_errors(tmp_path):
  path = build_bpe_vocab(["ab ab"], 50, tmp_path / "small.txt.gz")
  tok = Tokenizer.from_pretrained(path)
  assert tok.vocab_size == 512 + 1 + 3  # only 'a b</w>' can be learned
  assert tok.encode("ab") == [512]
  with pytest.raises(ValueError, match="num_merges"):
    build_bpe_vocab(["x"], -1, tmp_path / "e.txt.gz")


def test_build_speed(tmp_path):
  captions = _corpus(20000, 1)
  start = time.perf_counter()
  path = build_bpe_vocab(captions, 2000, tmp_path / "big.txt.gz")
  elapsed = time.perf_counter() - start
  tok = Tokenizer.from_pretrained(path)
  assert tok.vocab_size == 512 + 2000 + 3
  assert elapsed < 30.0, f"build_bpe_vocab took {elapsed:.1f}s for 20k captions / 2000 merges"
