"""Procedural pedestrian renderer for the synthetic retrieval dataset.

A person is drawn with PIL polygons at 2x resolution (then box-downsampled for
anti-aliasing) in a unit body frame: height 1 from the soles (v=0) to the top of
the head (v=1), u horizontal.  Frontal views (front/back) share one skeleton;
profile views (left/right) use a walking skeleton with swinging legs and arms.
The person is composited onto a procedural street/indoor/park background, then
occluders, lighting, colour cast, noise, blur and low-resolution degradations
are applied.  All randomness comes from the numpy Generator passed in, so an
image is a pure function of (attributes, hidden factors, scene, rng state).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]

# Base RGB of every colour word the generator uses for garments/bags/hats.
COLOURS: dict[str, RGB] = {
    "black": (28, 28, 32),
    "white": (236, 236, 232),
    "grey": (130, 130, 134),
    "red": (196, 32, 38),
    "blue": (38, 84, 196),
    "green": (42, 140, 64),
    "yellow": (232, 200, 40),
    "pink": (238, 146, 182),
    "purple": (118, 52, 150),
    "orange": (238, 126, 30),
    "brown": (118, 74, 40),
    "beige": (206, 186, 146),
}
HAIR_RGB: dict[str, RGB] = {
    "black": (22, 20, 20),
    "brown": (92, 58, 32),
    "blonde": (214, 182, 118),
    "grey": (168, 168, 166),
}
SKIN_TONES: tuple[RGB, ...] = (
    (247, 214, 190), (236, 192, 160), (222, 172, 136), (198, 144, 104),
    (160, 110, 76), (118, 80, 56),
)
VIEWS = ("front", "back", "left", "right")

# Heights (v) of body landmarks in the unit frame.
_HEAD_C, _NECK, _SHOULDER = 0.935, 0.862, 0.815
_WAIST, _HIP, _CROTCH, _KNEE, _ANKLE = 0.60, 0.52, 0.47, 0.27, 0.045


@dataclasses.dataclass(frozen=True)
class Scene:
  """Per-image nuisance factors that matter for visibility and geometry.

  Fractions are of the image height (scale, foot_y) or width (cx).
  """
  view: str               # front | back | left | right
  swing: float            # stride amplitude (radians) for profile views
  phase: float            # -1..1: which leg/arm leads
  stance: float           # frontal foot spread (units)
  scale: float            # person height / image height
  cx: float               # person centre x / image width
  foot_y: float           # sole y / image height (> 1 means feet cut off)
  occluder: str           # none | box | pedestrian | pole
  occ_height: float       # box: occluded height / person height
  occ_side: float         # pedestrian/pole: -1 left .. +1 right of the person
  background: str         # street | indoor | park


def sample_scene(rng: np.random.Generator, view: str, attrs: dict[str, Any]) -> Scene:
  """Samples the scene of one image for a given view (pure function of rng)."""
  umbrella = attrs.get("accessory") == "umbrella"
  max_scale = 0.76 if umbrella else 0.9
  scale = float(rng.uniform(0.72, max_scale))
  r = rng.random()
  if r < 0.12 and not umbrella:          # feet cut by the bottom border
    foot_y = float(rng.uniform(1.01, 1.05))
  else:
    foot_y = float(rng.uniform(0.93, 0.995))
  occ_r = rng.random()
  if occ_r < 0.12:
    occluder, occ_height = "box", float(rng.uniform(0.12, 0.5))
  elif occ_r < 0.24:
    occluder, occ_height = "pedestrian", 0.0
  elif occ_r < 0.30:
    occluder, occ_height = "pole", 0.0
  else:
    occluder, occ_height = "none", 0.0
  return Scene(
      view=view,
      swing=float(rng.uniform(0.0, 0.42)) if view in ("left", "right") else 0.0,
      phase=float(rng.uniform(-1.0, 1.0)),
      stance=float(rng.uniform(0.0, 0.03)),
      scale=scale,
      cx=float(rng.uniform(0.4, 0.6)),
      foot_y=foot_y,
      occluder=occluder,
      occ_height=occ_height,
      occ_side=float(rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.85)),
      background=str(rng.choice(["street", "street", "indoor", "park"])),
  )


def visibility(attrs: dict[str, Any], hidden: dict[str, Any], scene: Scene) -> dict[str, float]:
  """How visible each attribute group is in the image: 1 full, 0.5 partial, 0 hidden.

  Groups: gender, build, hair, upper, pattern, lower, shoes, bag, headwear, accessory.
  """
  v = {k: 1.0 for k in ("gender", "build", "hair", "upper", "pattern", "lower", "shoes",
                        "bag", "headwear", "accessory")}
  view = scene.view
  if attrs["upper_pattern"] == "logo" and view != "front":
    v["pattern"] = 0.0
  if attrs["accessory"] == "glasses" and view == "back":
    v["accessory"] = 0.0
  if attrs["accessory"] == "scarf" and view == "back":
    v["accessory"] = 0.5
  if attrs["bag"] == "backpack" and view == "front":
    v["bag"] = 0.5                       # only the straps show
  if attrs["bag"] == "handbag" and view in ("left", "right"):
    near = "right" if view == "right" else "left"
    if hidden["bag_hand"] != near:
      v["bag"] = 0.5                     # mostly hidden behind the body
  if scene.foot_y > 1.012:
    v["shoes"] = 0.0
  if scene.occluder == "box":
    h = scene.occ_height
    v["shoes"] = 0.0
    if h > 0.42:
      v["lower"] = 0.0
      if attrs["bag"] == "handbag":
        v["bag"] = 0.0
    elif h > 0.3:
      v["lower"] = 0.5
  if attrs["lower_type"] == "none":
    v["lower"] = 0.0
  if attrs["bag"] == "none":
    v["bag"] = 0.0
  if attrs["headwear"] == "none":
    v["headwear"] = 0.0
  if attrs["accessory"] == "none":
    v["accessory"] = 0.0
  if attrs["upper_pattern"] == "plain":
    v["pattern"] = 0.0
  return v


def _shade(c: RGB, f: float) -> RGB:
  return (min(255, max(0, int(c[0] * f))), min(255, max(0, int(c[1] * f))),
          min(255, max(0, int(c[2] * f))))


def _mix(a: RGB, b: RGB, t: float) -> RGB:
  return (int(a[0] + (b[0] - a[0]) * t), int(a[1] + (b[1] - a[1]) * t),
          int(a[2] + (b[2] - a[2]) * t))


def _outline(c: RGB) -> RGB:
  """A fold/outline colour that stays visible on dark garments."""
  lum = 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
  return _mix(c, (150, 150, 150), 0.35) if lum < 70 else _shade(c, 0.75)


def colour_rgb(name: str, shade: float) -> RGB:
  """RGB of a colour word with a per-identity shade factor (white/black kept recognisable)."""
  base = COLOURS[name]
  if name == "white":
    shade = min(1.0, max(0.9, shade))
  elif name == "black":
    return _mix(base, (60, 60, 66), max(0.0, shade - 1.0) * 2)
  return _shade(base, shade)


class _Pen:
  """Draws unit-frame shapes on a 2x canvas (and optionally into a garment mask)."""

  def __init__(self, img: Image.Image, cx: float, fy: float, s: float, flip: float):
    self.draw = ImageDraw.Draw(img)
    self.cx, self.fy, self.s, self.flip = cx, fy, s, flip
    self.dv = 0.0
    self.mask: ImageDraw.ImageDraw | None = None

  def p(self, u: float, v: float) -> tuple[float, float]:
    return (self.cx + self.flip * u * self.s, self.fy - (v + self.dv) * self.s)

  def poly(self, pts, fill: RGB, m: bool = False) -> None:
    xy = [self.p(u, v) for u, v in pts]
    self.draw.polygon(xy, fill=fill)
    if m and self.mask is not None:
      self.mask.polygon(xy, fill=255)

  def ellipse(self, u: float, v: float, ru: float, rv: float, fill: RGB, m: bool = False) -> None:
    x0, y0 = self.p(u - ru, v + rv)
    x1, y1 = self.p(u + ru, v - rv)
    box = [min(x0, x1), y0, max(x0, x1), y1]
    self.draw.ellipse(box, fill=fill)
    if m and self.mask is not None:
      self.mask.ellipse(box, fill=255)

  def chord(self, u: float, v: float, ru: float, rv: float, fill: RGB, top: bool = True) -> None:
    x0, y0 = self.p(u - ru, v + rv)
    x1, y1 = self.p(u + ru, v - rv)
    box = [min(x0, x1), y0, max(x0, x1), y1]
    self.draw.chord(box, 180, 360, fill=fill) if top else self.draw.chord(box, 0, 180, fill=fill)

  def limb(self, a, b, wa: float, wb: float, fill: RGB, m: bool = False, caps: bool = True) -> None:
    (ua, va), (ub, vb) = a, b
    du, dv = ub - ua, vb - va
    n = math.hypot(du, dv) or 1e-6
    nu, nv = -dv / n, du / n
    self.poly([(ua + nu * wa, va + nv * wa), (ub + nu * wb, vb + nv * wb),
               (ub - nu * wb, vb - nv * wb), (ua - nu * wa, va - nv * wa)], fill, m)
    if caps:
      self.ellipse(ua, va, wa, wa, fill, m)
      self.ellipse(ub, vb, wb, wb, fill, m)

  def line(self, pts, fill: RGB, width: float) -> None:
    self.draw.line([self.p(u, v) for u, v in pts], fill=fill,
                   width=max(1, int(round(width * self.s))), joint="curve")


@dataclasses.dataclass
class _Body:
  sh: float      # shoulder half-width
  wa: float      # waist half-width
  hp: float      # hip half-width
  dp: float      # torso half-depth (profile)
  leg: float     # thigh half-width
  arm: float     # upper-arm half-width
  head_ru: float
  head_rv: float


def _body(attrs: dict[str, Any], hidden: dict[str, Any]) -> _Body:
  female = attrs["gender"] == "female"
  b = {"slim": 0.9, "average": 1.0, "heavy": 1.16}[attrs["build"]]
  w = hidden["width"]
  return _Body(
      sh=(0.097 if female else 0.113) * b * w,
      wa=(0.068 if female else 0.082) * (b ** 1.8) * w,
      hp=(0.097 if female else 0.088) * (b ** 1.2) * w,
      dp=(0.056 if female else 0.06) * (b ** 1.6) * w,
      leg=(0.037 if female else 0.041) * (b ** 1.4),
      arm=0.021 * (b ** 1.3),
      head_ru=0.045 if female else 0.048,
      head_rv=0.064,
  )


def _garment_colours(attrs, hidden):
  up = colour_rgb(attrs["upper_colour"], hidden["shade"]["upper"])
  lo = colour_rgb(attrs["lower_colour"], hidden["shade"]["lower"]) if attrs["lower_colour"] else None
  if attrs["lower_type"] == "jeans" and lo is not None:
    lo = _mix(lo, (70, 90, 130), 0.15)
  shoe = colour_rgb(attrs["shoe_colour"], hidden["shade"]["shoes"])
  return up, lo, shoe


def _hem(attrs: dict[str, Any]) -> float:
  return {"t-shirt": 0.5, "shirt": 0.5, "sweater": 0.5, "jacket": 0.48, "coat": 0.33,
          "dress": 0.31}[attrs["upper_type"]]


def _apply_pattern(img: Image.Image, mask: Image.Image, attrs, hidden, base: RGB, s: float,
                   fy: float) -> None:
  """Paints stripes or checks onto the garment pixels recorded in ``mask``."""
  pat = attrs["upper_pattern"]
  if pat not in ("stripes", "checks"):
    return
  box = mask.getbbox()
  if box is None:
    return
  x0, y0, x1, y1 = box
  m = np.asarray(mask.crop(box), dtype=np.uint8)
  period = hidden["pattern_period"] * s
  ys = (np.arange(y0, y1, dtype=np.float32) - fy)[:, None] / period
  alt = COLOURS[attrs["pattern_colour"]]
  if pat == "stripes":
    band = (ys % 1.0) < 0.42
    band = np.broadcast_to(band, m.shape)
  else:
    xs = (np.arange(x0, x1, dtype=np.float32))[None, :] / period
    band = ((ys % 1.0) < 0.28) | ((xs % 1.0) < 0.28)
  sel = (m > 0) & band
  layer = Image.new("RGB", (x1 - x0, y1 - y0), alt)
  img.paste(layer, (x0, y0), Image.fromarray((sel * 255).astype(np.uint8)))


def _logo(pen: _Pen, hidden, up: RGB, v: float = 0.72) -> None:
  lum = 0.3 * up[0] + 0.59 * up[1] + 0.11 * up[2]
  col = hidden["logo_colour"] or ((245, 245, 245) if lum < 120 else (25, 25, 30))
  shape = hidden["logo_shape"]
  if shape == 0:
    pen.ellipse(0.0, v, 0.032, 0.03, col)
    pen.ellipse(0.0, v, 0.016, 0.015, up)
  elif shape == 1:
    pen.poly([(-0.034, v - 0.025), (0.034, v - 0.025), (0.0, v + 0.032)], col)
  elif shape == 2:
    pen.poly([(-0.036, v - 0.022), (0.036, v - 0.022), (0.036, v + 0.022), (-0.036, v + 0.022)], col)
    pen.line([(-0.024, v + 0.006), (0.024, v + 0.006)], up, 0.008)
    pen.line([(-0.024, v - 0.01), (0.012, v - 0.01)], up, 0.008)
  else:
    pts = []
    for k in range(10):
      r = 0.036 if k % 2 == 0 else 0.015
      a = math.pi / 2 + k * math.pi / 5
      pts.append((r * math.cos(a), v + r * math.sin(a)))
    pen.poly(pts, col)


def _shoe_frontal(pen: _Pen, u: float, v0: float, attrs, col: RGB) -> None:
  t = attrs["shoe_type"]
  if t == "boots":
    pen.poly([(u - 0.032, v0 + 0.12), (u + 0.032, v0 + 0.12), (u + 0.035, v0 + 0.012),
              (u - 0.035, v0 + 0.012)], col)
    pen.ellipse(u, v0 + 0.018, 0.036, 0.02, col)
  else:
    pen.ellipse(u, v0 + 0.022, 0.034, 0.024, col)
    if t == "sneakers":
      sole = (200, 200, 200) if sum(col) > 600 else (240, 240, 238)
      pen.poly([(u - 0.034, v0 + 0.014), (u + 0.034, v0 + 0.014), (u + 0.03, v0 + 0.0),
                (u - 0.03, v0 + 0.0)], sole)
    else:
      pen.ellipse(u + 0.008, v0 + 0.03, 0.01, 0.006, _shade(col, 1.5) if sum(col) < 200
                  else _shade(col, 1.15))


def _shoe_profile(pen: _Pen, ank, tilt: float, attrs, col: RGB) -> None:
  t = attrs["shoe_type"]
  ua, va = ank
  c, s_ = math.cos(tilt), math.sin(tilt)

  def r(du, dv):
    return (ua + du * c - dv * s_, va - 0.035 + du * s_ + dv * c)

  if t == "boots":
    pen.poly([r(-0.032, 0.11), r(0.028, 0.11), r(0.03, 0.03), r(0.075, 0.012), r(0.078, -0.01),
              r(-0.034, -0.01)], col)
  else:
    pen.poly([r(-0.03, 0.03), r(0.025, 0.03), r(0.07, 0.012), r(0.075, -0.008), r(-0.032, -0.008)],
             col)
    if t == "sneakers":
      sole = (200, 200, 200) if sum(col) > 600 else (240, 240, 238)
      pen.poly([r(-0.032, 0.0), r(0.075, 0.0), r(0.075, -0.01), r(-0.032, -0.01)], sole)


def _hand(pen: _Pen, u: float, v: float, skin: RGB) -> None:
  pen.ellipse(u, v, 0.019, 0.022, skin)


def _render_frontal(pen: _Pen, img: Image.Image, mask_img: Image.Image, attrs, hidden,
                    scene: Scene) -> None:
  """Front or back view (back: flip=-1 so the person's right is on the image right)."""
  back = scene.view == "back"
  B = _body(attrs, hidden)
  skin = hidden["skin"]
  up, lo, shoe = _garment_colours(attrs, hidden)
  hair = _shade(HAIR_RGB[attrs["hair_colour"]], hidden["hair_shade"])
  ut, lt = attrs["upper_type"], attrs["lower_type"]
  hl = attrs["hair_length"]
  outline_up = _outline(up)
  # Person's right side is u<0 in the canonical frame.
  side_u = {"right": -1.0, "left": 1.0}
  bag_u = side_u[hidden["bag_hand"]]
  umbrella_u = -bag_u

  # Legs.
  lift = 0.02 * abs(scene.phase)
  lift_leg = -1.0 if scene.phase < 0 else 1.0
  legs = []
  for sgn in (-1.0, 1.0):
    hipj = (sgn * B.hp * 0.5, _HIP - 0.01)
    ank_u = sgn * (B.hp * 0.42 + scene.stance)
    ank_v = _ANKLE + (lift if sgn == lift_leg else 0.0)
    knee = (sgn * (B.hp * 0.45 + scene.stance * 0.5), _KNEE + (lift * 0.6 if sgn == lift_leg else 0))
    legs.append((hipj, knee, (ank_u, ank_v)))
  # Long hair behind the back (front view: visible beside the neck/shoulders).
  if hl == "long" and not back:
    pen.poly([(-0.058, 0.95), (0.058, 0.95), (0.074, 0.70), (-0.074, 0.70)], _shade(hair, 0.85))
  for hipj, knee, ank in legs:
    pen.limb(hipj, knee, B.leg * 0.9, B.leg * 0.65, skin)
    pen.limb(knee, ank, B.leg * 0.65, B.leg * 0.5, skin)
  lower_cover = lt in ("trousers", "jeans", "shorts")
  if lower_cover:
    pen.poly([(-B.wa, _WAIST), (B.wa, _WAIST), (B.hp, _HIP), (B.hp * 0.96, _CROTCH - 0.025),
              (-B.hp * 0.96, _CROTCH - 0.025), (-B.hp, _HIP)], lo)
    for hipj, knee, ank in legs:
      if lt == "shorts":
        end = (hipj[0] + (knee[0] - hipj[0]) * 0.62, hipj[1] + (knee[1] - hipj[1]) * 0.62)
        pen.limb(hipj, end, B.leg * 1.12, B.leg * 1.02, lo, caps=False)
      else:
        pen.limb(hipj, knee, B.leg * 1.1, B.leg * 0.86, lo, caps=False)
        pen.ellipse(knee[0], knee[1], B.leg * 0.86, B.leg * 0.86, lo)
        pen.limb(knee, (ank[0], ank[1] + 0.005), B.leg * 0.86, B.leg * 0.76, lo, caps=False)
    pen.line([(0.0, _CROTCH - 0.01), (0.0, _CROTCH - 0.06)], _shade(lo, 0.7), 0.006)
    if lt == "jeans":
      seam = _mix(lo, (230, 230, 230), 0.25)
      for hipj, knee, ank in legs:
        o = 0.7 * (1 if hipj[0] > 0 else -1) * B.leg
        pen.line([(hipj[0] + o, hipj[1] - 0.02), (knee[0] + o * 0.8, knee[1]),
                  (ank[0] + o * 0.7, ank[1] + 0.03)], seam, 0.004)
  for _, _, ank in legs:
    _shoe_frontal(pen, ank[0], ank[1] - _ANKLE, attrs, shoe)
  if lt == "skirt":
    pen.poly([(-B.wa * 1.02, _WAIST), (B.wa * 1.02, _WAIST), (B.hp * 1.4, 0.33),
              (-B.hp * 1.4, 0.33)], lo)
    pen.line([(-B.hp * 0.5, 0.5), (-B.hp * 0.7, 0.34)], _shade(lo, 0.8), 0.005)
    pen.line([(B.hp * 0.5, 0.5), (B.hp * 0.7, 0.34)], _shade(lo, 0.8), 0.005)

  # Neck.
  pen.poly([(-0.022, _NECK + 0.03), (0.022, _NECK + 0.03), (0.024, _NECK - 0.015),
            (-0.024, _NECK - 0.015)], _shade(skin, 0.9))
  # Torso / upper garment.
  hem = _hem(attrs)
  hem_hw = {"coat": B.hp * 1.3, "jacket": B.hp * 1.1, "dress": B.hp * 1.5}.get(
      ut, max(B.hp, B.wa) * 1.05)
  mid_hw = max(B.wa * 1.04, B.hp * 1.02) if ut != "dress" else B.wa * 1.0
  torso = [(-0.03, _NECK + 0.002), (-B.sh * 0.78, _SHOULDER + 0.025), (-B.sh, _SHOULDER),
           (-B.sh * 1.02, _SHOULDER - 0.04), (-B.sh * 0.93, 0.7), (-B.wa * 1.04, _WAIST)]
  if hem < _WAIST - 0.05:
    torso.append((-mid_hw, _HIP))
  torso.append((-hem_hw, hem))
  torso_r = [(-u, v) for u, v in reversed(torso)]
  pen.mask = ImageDraw.Draw(mask_img)
  pen.poly(torso + torso_r, up, m=True)
  # Arms (sleeves recorded in the mask so patterns continue onto them).
  arms = []
  for sgn in (-1.0, 1.0):
    sj = (sgn * (B.sh - 0.014), _SHOULDER - 0.012)
    if attrs["accessory"] == "umbrella" and sgn == umbrella_u:
      el = (sgn * (B.sh + 0.03), 0.66)
      wr = (sgn * (B.sh * 0.55), 0.73)
    else:
      swing = 0.012 * scene.phase * sgn
      el = (sgn * (B.sh + 0.012), 0.645 + swing)
      wr = (sgn * (B.sh + 0.006) + 0.01 * scene.phase, 0.495 + 1.6 * swing)
    arms.append((sj, el, wr))
  long_sleeve = ut in ("shirt", "sweater", "jacket", "coat")
  sleeve_w = B.arm * (1.35 if ut == "coat" else 1.18)
  for sj, el, wr in arms:
    if long_sleeve:
      pen.limb(sj, el, sleeve_w, sleeve_w * 0.92, up, m=True)
      pen.limb(el, wr, sleeve_w * 0.92, sleeve_w * 0.8, up, m=True)
    else:
      pen.limb(sj, el, B.arm, B.arm * 0.85, skin)
      pen.limb(el, wr, B.arm * 0.85, B.arm * 0.7, skin)
      if ut == "t-shirt" or (ut == "dress" and hidden["dress_sleeves"]):
        mid = (sj[0] + (el[0] - sj[0]) * 0.55, sj[1] + (el[1] - sj[1]) * 0.55)
        pen.limb(sj, mid, sleeve_w * 1.15, sleeve_w * 1.1, up, m=True)
  _apply_pattern(img, mask_img, attrs, hidden, up, pen.s, pen.fy)
  pen.mask = None
  # Arm outlines and hands.
  for sj, el, wr in arms:
    if long_sleeve:
      pen.line([sj, el, wr], outline_up, 0.005)
    _hand(pen, wr[0], wr[1] - 0.02, skin)
  # Garment details.
  if ut in ("t-shirt", "sweater", "dress") and not back:
    pen.chord(0.0, _NECK + 0.004, 0.03, 0.022, _shade(skin, 0.92), top=False)
  if ut == "sweater":
    pen.poly([(-hem_hw, hem + 0.022), (hem_hw, hem + 0.022), (hem_hw, hem), (-hem_hw, hem)],
             _shade(up, 0.85))
  if ut == "shirt" and not back:
    pen.poly([(-0.03, _NECK + 0.005), (0.0, _NECK - 0.03), (-0.004, _NECK - 0.035),
              (-0.036, _NECK - 0.01)], _shade(up, 1.12))
    pen.poly([(0.03, _NECK + 0.005), (0.0, _NECK - 0.03), (0.004, _NECK - 0.035),
              (0.036, _NECK - 0.01)], _shade(up, 1.12))
    for k in range(4):
      pen.ellipse(0.0, 0.79 - k * 0.07, 0.004, 0.004, _shade(up, 0.65))
  if ut in ("jacket", "coat"):
    if not back:
      pen.line([(0.0, _NECK - 0.01), (0.0, hem)], _shade(up, 0.6), 0.006)
      pen.poly([(-0.032, _NECK + 0.004), (-0.004, 0.74), (-0.045, 0.8)], _shade(up, 0.8))
      pen.poly([(0.032, _NECK + 0.004), (0.004, 0.74), (0.045, 0.8)], _shade(up, 0.8))
      if ut == "coat":
        for k in range(3):
          pen.ellipse(0.018, 0.69 - k * 0.08, 0.005, 0.005, _shade(up, 0.55))
    else:
      pen.poly([(-0.04, _NECK + 0.004), (0.04, _NECK + 0.004), (0.045, _NECK - 0.02),
                (-0.045, _NECK - 0.02)], _shade(up, 0.85))
      if ut == "coat":
        pen.line([(0.0, 0.55), (0.0, hem)], _shade(up, 0.7), 0.005)
    if ut == "jacket":
      pen.poly([(-hem_hw, hem + 0.02), (hem_hw, hem + 0.02), (hem_hw, hem), (-hem_hw, hem)],
               _shade(up, 0.82))
  if ut == "dress":
    pen.line([(-B.wa, _WAIST), (B.wa, _WAIST)], _shade(up, 0.75), 0.006)
  if attrs["upper_pattern"] == "logo" and not back:
    _logo(pen, hidden, up, 0.73 if ut != "jacket" else 0.76)

  # Long hair falling over the back (back view) or shoulders (front view).
  if hl == "long":
    if back:
      pen.poly([(-0.058, 0.95), (0.058, 0.95), (0.072, 0.66), (0.0, 0.64), (-0.072, 0.66)], hair)
    else:
      for sgn in (-1.0, 1.0):
        pen.poly([(sgn * 0.03, 0.93), (sgn * 0.062, 0.92), (sgn * 0.07, 0.74),
                  (sgn * 0.045, 0.72)], hair)
  # Bags.
  bag, bagc = attrs["bag"], None
  if bag != "none":
    bagc = colour_rgb(attrs["bag_colour"], hidden["shade"]["bag"])
    if bag == "backpack":
      if back:
        pen.poly([(-B.sh * 0.74, 0.81), (B.sh * 0.74, 0.81), (B.sh * 0.8, 0.57),
                  (-B.sh * 0.8, 0.57)], bagc)
        pen.ellipse(0.0, 0.815, B.sh * 0.74, 0.02, bagc)
        pen.poly([(-B.sh * 0.55, 0.68), (B.sh * 0.55, 0.68), (B.sh * 0.58, 0.585),
                  (-B.sh * 0.58, 0.585)], _shade(bagc, 0.78))
        pen.line([(-B.sh * 0.5, 0.68), (B.sh * 0.5, 0.68)], _shade(bagc, 0.6), 0.004)
      else:
        for sgn in (-1.0, 1.0):
          pen.limb((sgn * B.sh * 0.55, _SHOULDER + 0.005), (sgn * B.sh * 0.62, 0.64), 0.011, 0.011,
                   _shade(bagc, 0.9), caps=False)
    elif bag == "shoulder bag":
      hang_u = bag_u
      pen.line([(-hang_u * B.sh * 0.55, _SHOULDER + 0.01), (hang_u * (B.hp + 0.005), 0.55)],
               _shade(bagc, 0.85), 0.011)
      pen.poly([(hang_u * (B.hp - 0.03), 0.56), (hang_u * (B.hp + 0.05), 0.56),
                (hang_u * (B.hp + 0.055), 0.48), (hang_u * (B.hp - 0.035), 0.48)], bagc)
      pen.line([(hang_u * (B.hp - 0.03), 0.54), (hang_u * (B.hp + 0.05), 0.54)],
               _shade(bagc, 0.7), 0.004)
    elif bag == "handbag":
      wr = arms[0 if bag_u < 0 else 1][2]
      hu, hv = wr[0], wr[1] - 0.03
      pen.line([(hu - 0.022, hv - 0.03), (hu, hv + 0.01), (hu + 0.022, hv - 0.03)],
               _shade(bagc, 0.7), 0.006)
      pen.poly([(hu - 0.035, hv - 0.03), (hu + 0.035, hv - 0.03), (hu + 0.042, hv - 0.105),
                (hu - 0.042, hv - 0.105)], bagc)
      _hand(pen, wr[0], wr[1] - 0.02, skin)
  # Scarf.
  if attrs["accessory"] == "scarf":
    sc = colour_rgb(attrs["accessory_colour"], hidden["shade"]["accessory"])
    pen.poly([(-0.045, _NECK + 0.012), (0.045, _NECK + 0.012), (0.05, _NECK - 0.03),
              (-0.05, _NECK - 0.03)], sc)
    if not back:
      pen.poly([(0.005, _NECK - 0.02), (0.04, _NECK - 0.02), (0.045, 0.68), (0.012, 0.68)],
               _shade(sc, 0.9))
  # Head.
  hu = 0.0
  if back:
    if hl in ("medium", "long"):
      pen.poly([(-0.05, 0.93), (0.05, 0.93), (0.052, 0.855), (-0.052, 0.855)], hair)
    pen.ellipse(-B.head_ru - 0.004, 0.93, 0.008, 0.014, skin)
    pen.ellipse(B.head_ru + 0.004, 0.93, 0.008, 0.014, skin)
    pen.ellipse(hu, _HEAD_C, B.head_ru + 0.004, B.head_rv + 0.004, hair)
  else:
    pen.ellipse(-B.head_ru, 0.93, 0.008, 0.014, skin)
    pen.ellipse(B.head_ru, 0.93, 0.008, 0.014, skin)
    hair_low = {"short": 0.94, "medium": 0.87, "long": 0.87}[hl]
    pen.ellipse(hu, _HEAD_C + 0.008, B.head_ru + 0.007, B.head_rv + 0.004, hair)
    if hl != "short":
      pen.poly([(-B.head_ru - 0.008, _HEAD_C), (B.head_ru + 0.008, _HEAD_C),
                (B.head_ru + 0.01, hair_low), (-B.head_ru - 0.01, hair_low)], hair)
    pen.ellipse(hu, _HEAD_C - 0.008, B.head_ru - 0.002, B.head_rv - 0.01, skin)
    # Fringe/parting.
    part = hidden["hair_part"]
    pen.chord(hu + part * 0.01, _HEAD_C + 0.028, B.head_ru - 0.001, 0.026, hair, top=True)
    eye = (40, 30, 30)
    pen.ellipse(-0.017, 0.94, 0.0055, 0.004, eye)
    pen.ellipse(0.017, 0.94, 0.0055, 0.004, eye)
    pen.line([(-0.01, 0.9), (0.01, 0.9)], _shade(skin, 0.7), 0.004)
    if attrs["accessory"] == "glasses":
      gc = hidden["glasses_colour"]
      for sgn in (-1.0, 1.0):
        x0, y0 = pen.p(sgn * 0.017 - 0.014, 0.95)
        x1, y1 = pen.p(sgn * 0.017 + 0.014, 0.93)
        pen.draw.rectangle([min(x0, x1), y0, max(x0, x1), y1], outline=gc,
                           width=max(1, int(0.005 * pen.s)))
      pen.line([(-0.004, 0.942), (0.004, 0.942)], gc, 0.004)
  # Headwear.
  hw = attrs["headwear"]
  if hw != "none":
    hc = colour_rgb(attrs["headwear_colour"], hidden["shade"]["headwear"])
    if hw == "cap":
      pen.chord(hu, _HEAD_C + 0.025, B.head_ru + 0.008, 0.058, hc, top=True)
      if not back:
        pen.ellipse(hu, _HEAD_C + 0.022, B.head_ru + 0.012, 0.012, _shade(hc, 0.8))
      else:
        pen.line([(-0.02, _HEAD_C + 0.02), (0.02, _HEAD_C + 0.02)], _shade(hc, 0.7), 0.006)
    else:
      pen.ellipse(hu, _HEAD_C + 0.035, B.head_ru + 0.05, 0.016, _shade(hc, 0.88))
      pen.poly([(-B.head_ru - 0.004, _HEAD_C + 0.035), (B.head_ru + 0.004, _HEAD_C + 0.035),
                (B.head_ru - 0.004, _HEAD_C + 0.095), (-B.head_ru + 0.004, _HEAD_C + 0.095)], hc)
      pen.poly([(-B.head_ru - 0.004, _HEAD_C + 0.05), (B.head_ru + 0.004, _HEAD_C + 0.05),
                (B.head_ru + 0.002, _HEAD_C + 0.036), (-B.head_ru - 0.002, _HEAD_C + 0.036)],
               _shade(hc, 0.6))
  if attrs["accessory"] == "umbrella":
    _umbrella(pen, arms[0 if umbrella_u < 0 else 1][2], attrs, hidden, skin)


def _umbrella(pen: _Pen, wr, attrs, hidden, skin: RGB) -> None:
  uc = colour_rgb(attrs["accessory_colour"], hidden["shade"]["accessory"])
  top_u = wr[0] * 0.6
  pen.line([(wr[0], wr[1] - 0.03), (top_u, 1.13)], (60, 60, 60), 0.007)
  pen.chord(top_u, 1.1, 0.27, 0.13, uc, top=True)
  for k in range(5):
    cu = top_u - 0.27 + 0.054 + k * 0.108
    pen.chord(cu, 1.1, 0.054, 0.018, uc, top=False)
  for k in (-1, 1):
    pen.line([(top_u, 1.23), (top_u + k * 0.13, 1.1)], _shade(uc, 0.75), 0.004)
  _hand(pen, wr[0], wr[1] - 0.02, skin)


def _render_profile(pen: _Pen, img: Image.Image, mask_img: Image.Image, attrs, hidden,
                    scene: Scene) -> None:
  """Left/right view drawn facing +u; ``pen.flip`` mirrors it for the left view."""
  B = _body(attrs, hidden)
  skin = hidden["skin"]
  up, lo, shoe = _garment_colours(attrs, hidden)
  hair = _shade(HAIR_RGB[attrs["hair_colour"]], hidden["hair_shade"])
  ut, lt, hl = attrs["upper_type"], attrs["lower_type"], attrs["hair_length"]
  near_hand = "right" if scene.view == "right" else "left"
  th = scene.swing * scene.phase
  d = B.dp
  # Legs: near leg angle +th, far leg -th; trailing shin bends backwards.
  l1, l2 = 0.235, 0.235

  def leg(theta):
    bend = 0.25 + max(0.0, -theta) * 0.9
    knee = (math.sin(theta) * l1, _HIP - math.cos(theta) * l1)
    phi = theta - bend
    ank = (knee[0] + math.sin(phi) * l2, knee[1] - math.cos(phi) * l2)
    return knee, ank, phi

  near_leg, far_leg = leg(th), leg(-th)
  drop = (_HIP - _ANKLE) - max(_HIP - near_leg[1][1], _HIP - far_leg[1][1])
  pen.dv = drop
  hipj = (0.0, _HIP)

  def arm(alpha, umbrella=False):
    sj = (-0.004, _SHOULDER - 0.012)
    if umbrella:
      el = (0.05, 0.69)
      wr = (0.085, 0.79)
    else:
      el = (sj[0] + math.sin(alpha) * 0.165, sj[1] - math.cos(alpha) * 0.165)
      beta = alpha + 0.25 + max(0.0, alpha) * 0.6
      wr = (el[0] + math.sin(beta) * 0.145, el[1] - math.cos(beta) * 0.145)
    return sj, el, wr

  umb_hand = None
  if attrs["accessory"] == "umbrella":
    umb_hand = "left" if hidden["bag_hand"] == "right" else "right"
  near_arm = arm(-th * 0.9, umb_hand == near_hand)
  far_arm = arm(th * 0.9, umb_hand is not None and umb_hand != near_hand)
  long_sleeve = ut in ("shirt", "sweater", "jacket", "coat")
  sleeve_w = B.arm * (1.35 if ut == "coat" else 1.18)
  pen.mask = ImageDraw.Draw(mask_img)

  def draw_arm(a, dark: float):
    sj, el, wr = a
    sk = _shade(skin, dark)
    if long_sleeve:
      pen.limb(sj, el, sleeve_w, sleeve_w * 0.92, _shade(up, dark), m=True)
      pen.limb(el, wr, sleeve_w * 0.92, sleeve_w * 0.8, _shade(up, dark), m=True)
    else:
      pen.limb(sj, el, B.arm, B.arm * 0.85, sk)
      pen.limb(el, wr, B.arm * 0.85, B.arm * 0.7, sk)
      if ut == "t-shirt" or (ut == "dress" and hidden["dress_sleeves"]):
        mid = (sj[0] + (el[0] - sj[0]) * 0.55, sj[1] + (el[1] - sj[1]) * 0.55)
        pen.limb(sj, mid, sleeve_w * 1.15, sleeve_w * 1.1, _shade(up, dark), m=True)
    _hand(pen, wr[0], wr[1] - 0.02, sk)

  bag = attrs["bag"]
  bagc = colour_rgb(attrs["bag_colour"], hidden["shade"]["bag"]) if bag != "none" else None

  def handbag(a, dark: float):
    wr = a[2]
    hu, hv = wr[0], wr[1] - 0.03
    c = _shade(bagc, dark)
    pen.line([(hu - 0.02, hv - 0.03), (hu, hv + 0.01), (hu + 0.02, hv - 0.03)], _shade(c, 0.7),
             0.006)
    pen.poly([(hu - 0.03, hv - 0.03), (hu + 0.03, hv - 0.03), (hu + 0.034, hv - 0.1),
              (hu - 0.034, hv - 0.1)], c)
    _hand(pen, wr[0], wr[1] - 0.02, _shade(skin, dark))

  # Far arm and far leg (behind the body, darker).
  if hl == "long":
    pen.poly([(-0.05, 0.95), (-0.005, 0.92), (-0.02, 0.69), (-0.062, 0.7)], _shade(hair, 0.85))
  draw_arm(far_arm, 0.8)
  if bag == "handbag" and hidden["bag_hand"] != near_hand:
    handbag(far_arm, 0.8)
  if attrs["accessory"] == "umbrella" and umb_hand != near_hand:
    _umbrella(pen, far_arm[2], attrs, hidden, _shade(skin, 0.8))

  def draw_leg(lg, dark: float):
    knee, ank, phi = lg
    sk = _shade(skin, dark)
    pen.limb(hipj, knee, B.leg * 0.9, B.leg * 0.65, sk)
    pen.limb(knee, ank, B.leg * 0.65, B.leg * 0.5, sk)
    if lt in ("trousers", "jeans"):
      c = _shade(lo, dark)
      pen.limb(hipj, knee, B.leg * 1.15, B.leg * 0.88, c)
      pen.limb(knee, (ank[0], ank[1] + 0.005), B.leg * 0.88, B.leg * 0.78, c)
      if lt == "jeans":
        pen.line([(hipj[0] - 0.01, hipj[1] - 0.03), knee, (ank[0], ank[1] + 0.03)],
                 _mix(c, (230, 230, 230), 0.22), 0.004)
    elif lt == "shorts":
      end = (knee[0] * 0.62, hipj[1] + (knee[1] - hipj[1]) * 0.62)
      pen.limb(hipj, end, B.leg * 1.2, B.leg * 1.05, _shade(lo, dark))
    _shoe_profile(pen, ank, max(-0.6, min(0.0, (phi + 0.1) * 0.8)), attrs, _shade(shoe, dark))

  draw_leg(far_leg, 0.8)
  draw_leg(near_leg, 1.0)
  if lt in ("trousers", "jeans", "shorts"):
    pen.poly([(-d * 1.0, _WAIST), (d * 0.95, _WAIST), (d * 0.95, _CROTCH - 0.01),
              (-d * 1.05, _CROTCH - 0.01)], lo)
  if lt == "skirt":
    pen.poly([(-d * 1.05, _WAIST), (d * 1.0, _WAIST), (d * 1.7 + 0.04 * abs(th), 0.33),
              (-d * 1.6 - 0.04 * abs(th), 0.33)], lo)
  # Neck, torso.
  pen.limb((0.004, _NECK - 0.01), (0.01, _NECK + 0.03), 0.02, 0.02, _shade(skin, 0.9))
  hem = _hem(attrs)
  belly = 1.15 if attrs["build"] == "heavy" else 1.0
  bust = 1.08 if attrs["gender"] == "female" else 1.0
  hem_f = {"coat": 1.35, "jacket": 1.12, "dress": 2.0}.get(ut, 1.05)
  back_pts = [(-d * 0.75, _NECK + 0.005), (-d * 1.02, _SHOULDER - 0.02), (-d * 0.95, 0.7),
              (-d * 0.88, _WAIST)]
  front_pts = [(d * 0.8, _NECK), (d * 0.98 * bust, 0.76), (d * 0.96 * belly, 0.66),
               (d * 0.92 * belly, _WAIST)]
  if hem < _WAIST - 0.05:
    back_pts.append((-d * 1.05, _HIP))
    front_pts.append((d * 1.0, _HIP))
  back_pts.append((-d * hem_f - (0.03 * abs(th) if ut == "dress" else 0), hem))
  front_pts.append((d * hem_f + (0.03 * abs(th) if ut == "dress" else 0), hem))
  pen.poly(back_pts + list(reversed(front_pts)), up, m=True)
  if bag == "backpack":
    pen.poly([(-d - 0.075, 0.8), (-d + 0.005, 0.81), (-d + 0.005, 0.57), (-d - 0.08, 0.575)], bagc)
    pen.poly([(-d - 0.09, 0.7), (-d - 0.06, 0.7), (-d - 0.06, 0.59), (-d - 0.092, 0.59)],
             _shade(bagc, 0.78))
  draw_arm(near_arm, 1.0)
  _apply_pattern(img, mask_img, attrs, hidden, up, pen.s, pen.fy - pen.dv * pen.s)
  pen.mask = None
  if long_sleeve:
    sj, el, wr = near_arm
    pen.line([sj, el, wr], _outline(up), 0.005)
    _hand(pen, wr[0], wr[1] - 0.02, skin)
  if ut in ("jacket", "coat"):
    pen.line([(d * 0.8, _NECK), (d * 0.95, hem)], _shade(up, 0.65), 0.005)
  if ut == "sweater":
    pen.line([(-d * 1.05, hem + 0.01), (d * 1.05, hem + 0.01)], _shade(up, 0.8), 0.014)
  if bag == "backpack":
    pen.limb((-d * 0.35, _SHOULDER + 0.008), (d * 0.55, 0.7), 0.01, 0.01, _shade(bagc, 0.85))
  elif bag == "shoulder bag":
    pen.line([(-d * 0.6, _SHOULDER + 0.01), (d * 0.7, 0.55)], _shade(bagc, 0.85), 0.011)
    pen.poly([(-d * 0.2, 0.56), (d * 0.9, 0.56), (d * 0.95, 0.47), (-d * 0.25, 0.47)], bagc)
  elif bag == "handbag" and hidden["bag_hand"] == near_hand:
    handbag(near_arm, 1.0)
  if hl == "long":
    pen.poly([(-0.05, 0.95), (-0.01, 0.93), (-0.022, 0.7), (-0.06, 0.71)], hair)
  if attrs["accessory"] == "scarf":
    sc = colour_rgb(attrs["accessory_colour"], hidden["shade"]["accessory"])
    pen.limb((-0.02, _NECK - 0.008), (0.03, _NECK - 0.012), 0.022, 0.022, sc)
    pen.poly([(0.02, _NECK - 0.02), (0.05, _NECK - 0.02), (0.055, 0.7), (0.028, 0.7)],
             _shade(sc, 0.9))
  # Head (profile).
  hcu = 0.008
  pen.ellipse(hcu, _HEAD_C, B.head_ru + 0.004, B.head_rv, skin)
  pen.poly([(hcu + B.head_ru, 0.94), (hcu + B.head_ru + 0.016, 0.918),
            (hcu + B.head_ru - 0.002, 0.912)], skin)
  pen.ellipse(hcu - 0.012, _HEAD_C + 0.014, B.head_ru - 0.002, B.head_rv - 0.008, hair)
  if hl != "short":
    pen.poly([(hcu - 0.05, _HEAD_C + 0.01), (hcu - 0.005, _HEAD_C + 0.01),
              (hcu - 0.01, 0.87), (hcu - 0.055, 0.87)], hair)
  pen.ellipse(hcu + 0.012, _HEAD_C - 0.006, B.head_ru - 0.012, B.head_rv - 0.014, skin)
  pen.ellipse(hcu - 0.004, 0.93, 0.009, 0.014, _shade(skin, 0.9))
  pen.ellipse(hcu + 0.033, 0.943, 0.005, 0.004, (40, 30, 30))
  if attrs["accessory"] == "glasses":
    gc = hidden["glasses_colour"]
    pen.line([(hcu + 0.02, 0.946), (hcu + 0.046, 0.946), (hcu + 0.046, 0.932),
              (hcu + 0.02, 0.932), (hcu + 0.02, 0.946), (hcu - 0.004, 0.94)], gc, 0.005)
  hw = attrs["headwear"]
  if hw != "none":
    hc = colour_rgb(attrs["headwear_colour"], hidden["shade"]["headwear"])
    if hw == "cap":
      pen.chord(hcu - 0.004, _HEAD_C + 0.025, B.head_ru + 0.01, 0.058, hc, top=True)
      pen.poly([(hcu + 0.02, _HEAD_C + 0.03), (hcu + B.head_ru + 0.045, _HEAD_C + 0.022),
                (hcu + B.head_ru + 0.045, _HEAD_C + 0.014), (hcu + 0.02, _HEAD_C + 0.018)],
               _shade(hc, 0.8))
    else:
      pen.ellipse(hcu, _HEAD_C + 0.035, B.head_ru + 0.055, 0.011, _shade(hc, 0.88))
      pen.poly([(hcu - B.head_ru, _HEAD_C + 0.035), (hcu + B.head_ru, _HEAD_C + 0.035),
                (hcu + B.head_ru - 0.008, _HEAD_C + 0.095), (hcu - B.head_ru + 0.008,
                                                               _HEAD_C + 0.095)], hc)
      pen.poly([(hcu - B.head_ru, _HEAD_C + 0.05), (hcu + B.head_ru, _HEAD_C + 0.05),
                (hcu + B.head_ru, _HEAD_C + 0.036), (hcu - B.head_ru, _HEAD_C + 0.036)],
               _shade(hc, 0.6))
  if attrs["accessory"] == "umbrella" and umb_hand == near_hand:
    _umbrella(pen, near_arm[2], attrs, hidden, skin)


def _background(rng: np.random.Generator, kind: str, w: int, h: int) -> Image.Image:
  """Procedural background at half resolution, upsampled (soft, out of focus)."""
  bw, bh = max(8, w // 2), max(8, h // 2)
  img = Image.new("RGB", (bw, bh))
  dr = ImageDraw.Draw(img)
  horizon = int(bh * rng.uniform(0.35, 0.72))
  if kind == "park":
    top = tuple(int(x) for x in rng.integers(40, 120, 3) * np.array([0.7, 1.2, 0.7]))
    ground = tuple(int(x) for x in np.array([70, 120, 60]) * rng.uniform(0.7, 1.2))
  elif kind == "indoor":
    top = tuple(int(x) for x in rng.integers(120, 220, 3))
    ground = tuple(int(x) for x in rng.integers(90, 180, 3))
  else:
    top = tuple(int(x) for x in rng.integers(70, 190) + rng.integers(-18, 18, 3))
    ground = tuple(int(x) for x in rng.integers(80, 160) + rng.integers(-10, 10, 3))
  top = tuple(min(255, max(0, c)) for c in top)
  ground = tuple(min(255, max(0, c)) for c in ground)
  dr.rectangle([0, 0, bw, horizon], fill=top)
  dr.rectangle([0, horizon, bw, bh], fill=ground)
  # Clutter: buildings, windows, doors, shop signs, trees, distant people.
  for _ in range(int(rng.integers(2, 7))):
    x0 = int(rng.integers(-bw // 2, bw))
    ww = int(rng.integers(bw // 6, bw))
    y0 = int(rng.integers(-bh // 4, horizon))
    col = tuple(int(c) for c in np.clip(np.array(top) + rng.integers(-60, 60, 3), 0, 255))
    if kind == "park" and rng.random() < 0.6:
      dr.ellipse([x0, y0, x0 + ww, y0 + int(ww * rng.uniform(0.8, 1.6))],
                 fill=tuple(int(c) for c in rng.integers(20, 110, 3) * np.array([0.6, 1.1, 0.5])))
    else:
      dr.rectangle([x0, y0, x0 + ww, horizon], fill=col)
      for _ in range(int(rng.integers(0, 4))):
        wx = x0 + int(rng.integers(0, max(1, ww)))
        wy = y0 + int(rng.integers(0, max(1, horizon - y0)))
        dr.rectangle([wx, wy, wx + int(rng.integers(3, 10)), wy + int(rng.integers(4, 14))],
                     fill=tuple(int(c) for c in rng.integers(20, 230, 3)))
  for _ in range(int(rng.integers(0, 4))):
    px = int(rng.integers(0, bw))
    ph = int(rng.integers(bh // 8, bh // 3))
    py = horizon + int(rng.integers(-ph // 2, max(1, (bh - horizon) // 2)))
    col = tuple(int(c) for c in rng.integers(20, 220, 3))
    dr.ellipse([px - ph // 10, py - ph, px + ph // 10, py - ph + ph // 5], fill=col)
    dr.rectangle([px - ph // 7, py - ph + ph // 6, px + ph // 7, py], fill=col)
  # Ground texture: tiles / road markings.
  for k in range(int(rng.integers(0, 6))):
    y = horizon + int((bh - horizon) * (k + 1) ** 1.6 / 20)
    if y < bh:
      dr.line([0, y, bw, y], fill=tuple(max(0, c - 18) for c in ground), width=1)
  img = img.resize((w, h), Image.BILINEAR)
  return img


def _occluder_pedestrian(dr: ImageDraw.ImageDraw, rng, x: float, fy: float, s: float) -> None:
  col_up = tuple(int(c) for c in rng.integers(20, 230, 3))
  col_lo = tuple(int(c) for c in rng.integers(20, 160, 3))
  skin = SKIN_TONES[int(rng.integers(0, len(SKIN_TONES)))]
  hw = 0.11 * s
  dr.rectangle([x - hw * 0.8, fy - 0.48 * s, x + hw * 0.8, fy - 0.03 * s], fill=col_lo)
  dr.rounded_rectangle([x - hw, fy - 0.84 * s, x + hw, fy - 0.45 * s], radius=int(hw * 0.4),
                       fill=col_up)
  dr.ellipse([x - 0.05 * s, fy - 0.99 * s, x + 0.05 * s, fy - 0.86 * s], fill=skin)
  dr.chord([x - 0.055 * s, fy - 1.0 * s, x + 0.055 * s, fy - 0.88 * s], 180, 360,
           fill=tuple(int(c) for c in rng.integers(10, 120, 3)))


_NOISE_BANK: list[np.ndarray] = []


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A (h, w, 3) int32 window of a fixed Gaussian noise bank (std 64) at a random offset.

  The bank is generated from a constant seed, so every process holds the same values and
  images stay a pure function of their own rng.
  """
  if not _NOISE_BANK:
    bank = np.random.default_rng(0x5EED).standard_normal((512, 512, 3)) * 64
    _NOISE_BANK.append(np.round(bank).astype(np.int32))
  bank = _NOISE_BANK[0]
  if h > bank.shape[0] or w > bank.shape[1]:
    bank = np.tile(bank, (-(-h // bank.shape[0]) + 1, -(-w // bank.shape[1]) + 1, 1))
  oy = int(rng.integers(0, bank.shape[0] - h + 1))
  ox = int(rng.integers(0, bank.shape[1] - w + 1))
  return bank[oy:oy + h, ox:ox + w]


def render_image(attrs: dict[str, Any], hidden: dict[str, Any], scene: Scene,
                 rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
  """Renders one pedestrian image of ``size`` = (height, width) as an RGB PIL image."""
  h, w = size
  ss = 2
  cw, ch = w * ss, h * ss
  bg = _background(rng, scene.background, w, h)
  s = scene.scale * ch * hidden["height"]
  fy = scene.foot_y * ch
  cx = scene.cx * cw
  # Ground shadow.
  bgd = ImageDraw.Draw(bg, "RGBA")
  bgd.ellipse([(cx - 0.16 * s) / ss, (fy - 0.025 * s) / ss, (cx + 0.16 * s) / ss,
               (fy + 0.02 * s) / ss], fill=(0, 0, 0, 70))
  person = Image.new("RGBA", (cw, ch), (0, 0, 0, 0))
  mask = Image.new("L", (cw, ch), 0)
  if scene.view in ("front", "back"):
    pen = _Pen(person, cx, fy, s, -1.0 if scene.view == "back" else 1.0)
    _render_frontal(pen, person, mask, attrs, hidden, scene)
  else:
    pen = _Pen(person, cx, fy, s, 1.0 if scene.view == "right" else -1.0)
    _render_profile(pen, person, mask, attrs, hidden, scene)
  person = person.reduce(ss)
  # Cylindrical shading of the person + light from one side (integer maths, per column).
  xs = (np.arange(w, dtype=np.float32) - scene.cx * w) / max(1.0, 0.16 * s / ss)
  light = float(rng.uniform(-0.5, 0.5))
  col = np.clip(1.0 - 0.16 * (xs - light) ** 2 + 0.06 * xs * light, 0.72, 1.0)
  arr = np.array(person)
  arr[..., :3] = (arr[..., :3].astype(np.uint16) * (col * 256).astype(np.uint16)[None, :, None]
                  >> 8).astype(np.uint8)
  img = Image.alpha_composite(bg.convert("RGBA"), Image.fromarray(arr, "RGBA")).convert("RGB")
  # Occluders (drawn in front of the person).
  dr = ImageDraw.Draw(img)
  s1, fy1, cx1 = s / ss, fy / ss, cx / ss
  if scene.occluder == "box":
    top = fy1 - scene.occ_height * s1
    col = tuple(int(c) for c in rng.integers(15, 230, 3))
    x0 = cx1 - float(rng.uniform(0.2, 0.6)) * w
    x1 = cx1 + float(rng.uniform(0.2, 0.6)) * w
    dr.rounded_rectangle([x0, top, x1, h + 4], radius=int(rng.integers(0, 6)), fill=col)
    dr.line([x0, top + 3, x1, top + 3], fill=tuple(min(255, c + 40) for c in col), width=2)
  elif scene.occluder == "pedestrian":
    x = cx1 + scene.occ_side * w * 0.55
    _occluder_pedestrian(dr, rng, x, fy1 + float(rng.uniform(0.0, 0.06)) * h,
                         s1 * float(rng.uniform(0.95, 1.15)))
  elif scene.occluder == "pole":
    x = cx1 + scene.occ_side * 0.12 * s1
    pw = float(rng.uniform(0.025, 0.05)) * w
    col = tuple(int(c) for c in rng.integers(30, 200, 3))
    dr.rectangle([x - pw, 0, x + pw, h], fill=col)
  # Photometric nuisance: exposure, colour cast, gamma, blur, low resolution, noise.
  if rng.random() < 0.25:
    img = img.filter(ImageFilter.BoxBlur(float(rng.uniform(0.4, 1.1))))
  if rng.random() < 0.2:
    f = float(rng.uniform(0.4, 0.7))
    img = img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.BILINEAR).resize(
        (w, h), Image.BILINEAR)
  # Exposure, per-channel colour cast and gamma as one lookup table per channel.
  gain = rng.uniform(0.7, 1.2) * rng.normal(1.0, 0.06, 3)
  gamma = rng.uniform(0.8, 1.25)
  ramp = np.arange(256, dtype=np.float64) / 255.0
  lut = np.concatenate([np.clip(np.clip(ramp * g, 0, 1) ** gamma * 255 + 0.5, 0, 255)
                        for g in gain]).astype(np.uint8)
  img = img.point(lut.tolist())
  # Vertical illumination gradient and sensor noise (fixed-point integer maths).
  g = np.linspace(float(rng.uniform(0.85, 1.1)), float(rng.uniform(0.85, 1.1)), h)
  g_q = np.round(g * 256).astype(np.int32)[:, None, None]
  sigma_q = int(rng.uniform(1.0, 6.0) * 4)
  x = (np.asarray(img, dtype=np.int32) * g_q + 128) >> 8
  x += (_noise(rng, h, w) * sigma_q) >> 8
  x = np.clip(x, 0, 255).astype(np.uint8)
  return Image.fromarray(x)
