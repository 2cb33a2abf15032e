"""Image transforms, host (uint8) and device (normalize + erase) halves together: re-derived
independently (float64 numpy, explicit padding) from the same rng."""
import copy
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tipr_jax.data import device_images
from tipr_jax.data import transforms as T

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _img(h=50, w=20, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def _normalized(uint8_images, boxes=None):
  """The device half (device_images.model_images, jitted) back on the host as numpy."""
  fn = jax.jit(device_images.model_images)
  return np.asarray(fn(uint8_images, boxes))


def test_test_transform_matches_float64_formula():
  arr = _img()
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, 'PNG')
  pixels = T.test_transform(buf.getvalue(), (64, 32))
  assert pixels.shape == (64, 32, 3) and pixels.dtype == np.uint8
  out = _normalized(pixels[None])[0]
  assert out.dtype == np.float32
  resized = np.asarray(Image.fromarray(arr).resize((32, 64), Image.BILINEAR), np.float64)
  ref = (resized / 255.0 - MEAN) / STD
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # Same size: no resampling at all.
  same = T.test_transform(Image.fromarray(arr), (50, 20))
  np.testing.assert_array_equal(same, arr)
  np.testing.assert_allclose(_normalized(same[None])[0], (arr / 255.0 - MEAN) / STD, atol=1e-6)


def test_every_pixel_value_normalizes_like_the_reference():
  values = np.arange(256, dtype=np.uint8)
  img = np.repeat(values[:, None, None], 3, axis=2)[None]  # [1, 256, 1, 3]
  out = _normalized(img)[0, :, 0]
  ref = (values[:, None] / 255.0 - MEAN) / STD
  np.testing.assert_allclose(out, ref, atol=1e-6)


def test_float_images_pass_through_and_integer_images_other_than_uint8_are_refused():
  x = np.random.default_rng(0).standard_normal((2, 8, 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(_normalized(x, np.zeros((2, 4), np.int32)), x)
  with pytest.raises(TypeError, match='uint8'):
    device_images.model_images(jnp.zeros((1, 8, 4, 3), jnp.int32))


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


def test_random_erase_box_follows_torchvision_rules_and_fills_the_normalized_mean():
  h, w = 64, 32
  areas, filled = [], 0
  pixels = np.full((h, w, 3), 7, np.uint8)
  boxes, expects = [], []
  for seed in range(300):
    rng = np.random.default_rng(seed)
    ref = copy.deepcopy(rng)
    boxes.append(T.random_erase_box(h, w, rng))
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
    # The reference erases the normalized image: everything else is (7/255 - mean) / std.
    expect = np.broadcast_to((7 / 255.0 - MEAN) / STD, (h, w, 3)).copy()
    if box is not None:
      t, l, eh, ew = box
      expect[t:t + eh, l:l + ew] = MEAN
      areas.append(eh * ew / (h * w))
      filled += 1
    else:
      assert not boxes[-1].any()
    expects.append(expect)
  boxes = np.stack(boxes)
  assert boxes.dtype == np.int32
  out = _normalized(np.broadcast_to(pixels, (300, h, w, 3)).copy(), boxes)
  np.testing.assert_allclose(out, np.stack(expects), atol=1e-6)
  assert 0.4 < filled / 300 < 0.6
  assert 0.015 < min(areas) and max(areas) < 0.45


def test_train_transform_deterministic_and_augments():
  buf = io.BytesIO()
  Image.fromarray(_img(80, 30)).save(buf, 'JPEG')
  data = buf.getvalue()
  a, box_a = T.train_transform(data, np.random.default_rng(3), (64, 32))
  b, box_b = T.train_transform(data, np.random.default_rng(3), (64, 32))
  c, box_c = T.train_transform(data, np.random.default_rng(4), (64, 32))
  assert a.shape == (64, 32, 3) and a.dtype == np.uint8 and box_a.shape == (4,)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(box_a, box_b)
  assert not (np.array_equal(a, c) and np.array_equal(box_a, box_c))
  plain, no_box = T.train_transform(data, np.random.default_rng(3), (64, 32), augment=False)
  np.testing.assert_array_equal(plain, T.test_transform(data, (64, 32)))
  assert not no_box.any()


def test_decode_rejects_garbage():
  with pytest.raises(OSError):
    T.decode(b'not an image')
