"""Image transforms on the host in numpy/PIL: the uint8 half of the reference's torchvision pipelines.

test:  Resize((H, W)) bilinear (PIL)                                   -> uint8 [H, W, 3]
train: Resize((H, W)) -> horizontal flip p=0.5 -> pad 10 with zeros + random crop (H, W)
       -> uint8 [H, W, 3], plus the random-erasing box (p=0.5, scale (0.02, 0.4), ratio
       (0.3, 3.3)) drawn here as int32 [4] = (top, left, h, w), zeros for none.

The float half ([0, 1] -> CLIP mean/std normalisation -> the box filled with the CLIP mean values
on the normalised image) runs on the device: `tipr_jax.data.device_images`. All randomness comes
from the given `np.random.Generator`.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

PAD = 10
FLIP_PROB = 0.5
ERASE_PROB = 0.5
ERASE_SCALE = (0.02, 0.4)
ERASE_RATIO = (0.3, 3.3)


def decode(data: bytes) -> Image.Image:
  """Decodes JPEG/PNG bytes to an RGB PIL image."""
  img = Image.open(io.BytesIO(data))
  return img if img.mode == 'RGB' else img.convert('RGB')


def resize(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
  """PIL bilinear resize to (H, W) (what torchvision's Resize does on PIL images); uint8 [H,W,3]."""
  h, w = size
  if img.size != (w, h):
    img = img.resize((w, h), Image.BILINEAR)
  return np.asarray(img, dtype=np.uint8)


def flip_pad_crop(img: np.ndarray, rng: np.random.Generator, *, pad: int = PAD,
                  flip_prob: float = FLIP_PROB) -> np.ndarray:
  """Random horizontal flip, then zero padding by `pad` and a random crop back to the same size."""
  if rng.random() < flip_prob:
    img = img[:, ::-1]
  h, w = img.shape[:2]
  # torchvision RandomCrop on the padded (h+2p, w+2p) image: top in [0, 2p], left in [0, 2p].
  top = int(rng.integers(0, 2 * pad + 1))
  left = int(rng.integers(0, 2 * pad + 1))
  dy, dx = top - pad, left - pad  # source offset of the crop
  out = np.zeros_like(img)
  ys, ye = max(0, dy), min(h, h + dy)
  xs, xe = max(0, dx), min(w, w + dx)
  out[ys - dy:ye - dy, xs - dx:xe - dx] = img[ys:ye, xs:xe]
  return out


def erase_box(h: int, w: int, rng: np.random.Generator, *, scale=ERASE_SCALE,
              ratio=ERASE_RATIO) -> tuple[int, int, int, int] | None:
  """torchvision RandomErasing.get_params: (top, left, height, width) or None after 10 misses."""
  area = h * w
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    erase_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    eh = int(round(math.sqrt(erase_area * aspect)))
    ew = int(round(math.sqrt(erase_area / aspect)))
    if not (eh < h and ew < w):
      continue
    top = int(rng.integers(0, h - eh + 1))
    left = int(rng.integers(0, w - ew + 1))
    return top, left, eh, ew
  return None


NO_ERASE = np.zeros(4, np.int32)


def random_erase_box(h: int, w: int, rng: np.random.Generator, *,
                     prob: float = ERASE_PROB) -> np.ndarray:
  """RandomErasing's draw for an [h, w] image: int32 (top, left, h, w) w.p. `prob`, else zeros."""
  if rng.random() < prob:
    box = erase_box(h, w, rng)
    if box is not None:
      return np.asarray(box, np.int32)
  return NO_ERASE.copy()


def test_transform(img: Image.Image | bytes, size: tuple[int, int]) -> np.ndarray:
  """Evaluation transform, host half: uint8 [H, W, 3] (normalised on the device)."""
  if isinstance(img, bytes):
    img = decode(img)
  return resize(img, size)


def train_transform(img: Image.Image | bytes, rng: np.random.Generator, size: tuple[int, int], *,
                    augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Training transform (reference `--img_aug`), host half: (uint8 [H, W, 3], erase box int32
  [4]). `augment=False` = the test transform and no box."""
  if isinstance(img, bytes):
    img = decode(img)
  arr = resize(img, size)
  if not augment:
    return arr, NO_ERASE.copy()
  arr = flip_pad_crop(arr, rng)
  return arr, random_erase_box(*size, rng)
