"""Image transforms: re-derived independently (float64 numpy, explicit padding) from the same rng."""
import copy
import io
import math

import numpy as np
import pytest
from PIL import Image

from tipr_jax.data import transforms as T

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _img(h=50, w=20, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def test_test_transform_matches_float64_formula():
  arr = _img()
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, 'PNG')
  out = T.test_transform(buf.getvalue(), (64, 32))
  assert out.shape == (64, 32, 3) and out.dtype == np.float32
  resized = np.asarray(Image.fromarray(arr).resize((32, 64), Image.BILINEAR), np.float64)
  ref = (resized / 255.0 - MEAN) / STD
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # Same size: no resampling at all.
  same = T.test_transform(Image.fromarray(arr), (50, 20))
  np.testing.assert_allclose(same, (arr / 255.0 - MEAN) / STD, atol=1e-6)


def test_grayscale_and_rgba_become_rgb():
  for mode in ('L', 'RGBA', 'P'):
    buf = io.BytesIO()
    Image.fromarray(_img()).convert(mode).save(buf, 'PNG')
    assert T.test_transform(buf.getvalue(), (16, 8)).shape == (16, 8, 3)


def test_flip_pad_crop_matches_explicit_padding():
  arr = _img(30, 12)
  seen_flip = set()
  for seed in range(40):
    rng = np.random.default_rng(seed)
    ref_rng = copy.deepcopy(rng)
    out = T.flip_pad_crop(arr, rng)
    flip = ref_rng.random() < 0.5
    src = arr[:, ::-1] if flip else arr
    padded = np.pad(src, ((10, 10), (10, 10), (0, 0)))
    top, left = ref_rng.integers(0, 21), ref_rng.integers(0, 21)
    np.testing.assert_array_equal(out, padded[top:top + 30, left:left + 12])
    seen_flip.add(flip)
  assert seen_flip == {True, False}


def test_random_erase_box_follows_torchvision_rules():
  h, w = 64, 32
  areas, filled = [], 0
  for seed in range(300):
    rng = np.random.default_rng(seed)
    ref = copy.deepcopy(rng)
    img = np.full((h, w, 3), 7.0, np.float32)
    T.random_erase(img, rng)
    # Independent re-derivation of torchvision RandomErasing.get_params.
    box = None
    if ref.random() < 0.5:
      for _ in range(10):
        ea = h * w * ref.uniform(0.02, 0.4)
        ar = math.exp(ref.uniform(math.log(0.3), math.log(3.3)))
        eh, ew = int(round(math.sqrt(ea * ar))), int(round(math.sqrt(ea / ar)))
        if eh < h and ew < w:
          box = (int(ref.integers(0, h - eh + 1)), int(ref.integers(0, w - ew + 1)), eh, ew)
          break
    expect = np.full((h, w, 3), 7.0, np.float32)
    if box is not None:
      t, l, eh, ew = box
      expect[t:t + eh, l:l + ew] = MEAN.astype(np.float32)
      areas.append(eh * ew / (h * w))
      filled += 1
    np.testing.assert_array_equal(img, expect)
  assert 0.4 < filled / 300 < 0.6
  assert 0.015 < min(areas) and max(areas) < 0.45


def test_train_transform_deterministic_and_augments():
  buf = io.BytesIO()
  Image.fromarray(_img(80, 30)).save(buf, 'JPEG')
  data = buf.getvalue()
  a = T.train_transform(data, np.random.default_rng(3), (64, 32))
  b = T.train_transform(data, np.random.default_rng(3), (64, 32))
  c = T.train_transform(data, np.random.default_rng(4), (64, 32))
  assert a.shape == (64, 32, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  plain = T.train_transform(data, np.random.default_rng(3), (64, 32), augment=False)
  np.testing.assert_array_equal(plain, T.test_transform(data, (64, 32)))


def test_decode_rejects_garbage():
  with pytest.raises(OSError):
    T.decode(b'not an image')
