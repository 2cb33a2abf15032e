"""Caption generator for the synthetic pedestrian dataset.

Captions imitate crowd-sourced annotators: several sentence styles, synonyms
("t-shirt"/"tee", "trousers"/"pants"), varied word order, and omissions.  An
attribute is only mentioned if it is visible in the image (see
``synthetic_render.visibility``), and many captions mention only some of the
visible attributes.  A small fraction of captions contains an annotator slip
(one colour replaced by a confusable colour), like the real datasets.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

# Surface forms of every attribute value (first entry is the most common form).
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black",), "white": ("white",), "grey": ("grey", "gray"), "red": ("red",),
    "blue": ("blue",), "green": ("green",), "yellow": ("yellow",), "pink": ("pink",),
    "purple": ("purple", "violet"), "orange": ("orange",), "brown": ("brown",),
    "beige": ("beige", "khaki", "tan"),
}
CONFUSABLE = {"black": "grey", "grey": "white", "white": "grey", "blue": "purple",
              "purple": "blue", "red": "orange", "orange": "red", "pink": "red",
              "brown": "black", "beige": "white", "green": "blue", "yellow": "orange"}
HAIR_COLOUR_WORDS = {"black": ("black", "dark"), "brown": ("brown", "dark brown"),
                     "blonde": ("blonde", "blond", "fair"), "grey": ("grey", "gray", "white")}
HAIR_LENGTH_WORDS = {"short": ("short",), "medium": ("shoulder-length", "medium-length"),
                     "long": ("long",)}
UPPER_WORDS = {
    "t-shirt": ("t-shirt", "tee", "t shirt", "short-sleeved shirt", "short sleeve top", "tshirt"),
    "shirt": ("shirt", "long-sleeved shirt", "button-up shirt", "long sleeve shirt"),
    "sweater": ("sweater", "jumper", "pullover", "sweatshirt"),
    "jacket": ("jacket", "zip-up jacket", "light jacket"),
    "coat": ("coat", "long coat", "overcoat", "trench coat"),
    "dress": ("dress", "knee-length dress", "one-piece dress"),
}
# (noun, plural?) for lower garments and shoes.
LOWER_WORDS = {
    "trousers": (("trousers", True), ("pants", True), ("slacks", True), ("long pants", True)),
    "jeans": (("jeans", True), ("denim jeans", True), ("denim pants", True)),
    "shorts": (("shorts", True), ("short pants", True)),
    "skirt": (("skirt", False), ("knee-length skirt", False)),
}
SHOE_WORDS = {
    "sneakers": ("sneakers", "trainers", "running shoes", "tennis shoes", "shoes"),
    "boots": ("boots", "ankle boots", "high boots"),
    "leather shoes": ("leather shoes", "dress shoes", "shoes", "flat shoes"),
}
BAG_WORDS = {"backpack": ("backpack", "rucksack", "school bag"),
             "shoulder bag": ("shoulder bag", "messenger bag", "crossbody bag"),
             "handbag": ("handbag", "purse", "hand bag", "tote bag")}
HEADWEAR_WORDS = {"cap": ("cap", "baseball cap"), "hat": ("hat", "wide-brimmed hat", "sun hat")}
ACCESSORY_WORDS = {"glasses": ("glasses", "eyeglasses", "spectacles"),
                   "umbrella": ("umbrella",), "scarf": ("scarf",)}
STRIPE_ADJ = ("striped",)
STRIPE_POST = ("with stripes", "with horizontal stripes")
CHECK_ADJ = ("checked", "plaid", "checkered")
CHECK_POST = ("with a check pattern", "with a plaid pattern")
LOGO_POST = ("with a logo on the front", "with a logo", "with a graphic on the chest",
             "with a print on the front")
GENDER_WORDS = {"male": ("man", "man", "young man", "guy", "gentleman", "male", "boy"),
                "female": ("woman", "woman", "young woman", "lady", "girl", "female")}
NEUTRAL_SUBJECTS = ("person", "pedestrian")
BUILD_WORDS = {"slim": ("slim", "thin", "slender"), "average": ("",),
               "heavy": ("heavy", "heavyset", "chubby", "stocky")}

_NON_ATTRIBUTE = {"a", "an", "the", "of", "on", "with", "front", "chest", "pattern", "sleeve",
                  "short-sleeved", "long-sleeved", "up", "zip-up", "button-up", "one-piece",
                  "male", "female"}
_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*")


def processed_tokens(caption: str, lowercase: bool = True) -> list[str]:
  """Word tokens without punctuation, like the ``processed_tokens`` field of reid_raw.json."""
  words = _TOKEN_RE.findall(caption)
  return [w.lower() for w in words] if lowercase else words


def attribute_vocabulary() -> list[str]:
  """Sorted words the generator uses to name attribute values (colours, garments, ...)."""
  phrases: list[str] = []
  for table in (COLOUR_WORDS, HAIR_COLOUR_WORDS, HAIR_LENGTH_WORDS, UPPER_WORDS, SHOE_WORDS,
                BAG_WORDS, HEADWEAR_WORDS, ACCESSORY_WORDS, GENDER_WORDS, BUILD_WORDS):
    for forms in table.values():
      phrases.extend(forms)
  for forms in LOWER_WORDS.values():
    phrases.extend(f for f, _ in forms)
  phrases += list(STRIPE_ADJ + STRIPE_POST + CHECK_ADJ + CHECK_POST + LOGO_POST)
  phrases += ["dark", "light", "hair", "stripes", "logo", "graphic", "print", "bag", "shoes"]
  words = set()
  for p in phrases:
    for w in processed_tokens(p):
      if w not in _NON_ATTRIBUTE:
        words.add(w)
  return sorted(words)


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
  return seq[int(rng.integers(0, len(seq)))]


def _article(np_: str) -> str:
  return ("an " if np_[0] in "aeiou" else "a ") + np_


class _Facts:
  """Realised noun phrases for one caption (None = not mentioned)."""

  def __init__(self):
    self.subject: str = "person"
    self.gendered = False
    self.build: str | None = None
    self.hair: str | None = None
    self.upper: str | None = None          # with article
    self.lower: str | None = None          # with article / bare plural
    self.lower_bare: tuple[str, str, bool] | None = None   # (colour, noun, plural)
    self.shoes: str | None = None
    self.shoes_bare: tuple[str, str] | None = None
    self.bag: str | None = None
    self.bag_kind: str | None = None
    self.headwear: str | None = None
    self.glasses: str | None = None
    self.umbrella: str | None = None
    self.scarf: str | None = None
    self.view: str | None = None
    self.mentioned: dict[str, Any] = {}    # slot -> value as stated in the caption


def _colour(rng, name: str, shade: float, slip: bool) -> str:
  if slip:
    name = CONFUSABLE[name]
  word = _pick(rng, COLOUR_WORDS[name])
  if name not in ("black", "white") and rng.random() < 0.35:
    if shade < 0.9:
      word = "dark " + word
    elif shade > 1.06:
      word = "light " + word
  return word


def _realise(attrs: dict[str, Any], hidden: dict[str, Any], vis: dict[str, float], view: str,
             rng: np.random.Generator, detail: float) -> _Facts:
  """Chooses which visible attributes to mention and how to phrase them."""
  f = _Facts()
  shade = hidden["shade"]
  slip_slot = None
  if rng.random() < 0.02:
    slip_slot = _pick(rng, ("upper", "lower", "shoes", "bag"))

  def include(group: str, p: float) -> bool:
    return vis.get(group, 1.0) > 0 and rng.random() < min(1.0, p * detail) * vis[group]

  female = attrs["gender"] == "female"
  said = f.mentioned
  if rng.random() < 0.9:
    f.subject, f.gendered = _pick(rng, GENDER_WORDS[attrs["gender"]]), True
    said["gender"] = attrs["gender"]
  else:
    f.subject = _pick(rng, NEUTRAL_SUBJECTS)
  if attrs["build"] != "average" and include("build", 0.22):
    f.build = _pick(rng, BUILD_WORDS[attrs["build"]])
    said["build"] = attrs["build"]
  if include("hair", 0.62):
    length = _pick(rng, HAIR_LENGTH_WORDS[attrs["hair_length"]])
    colour = _pick(rng, HAIR_COLOUR_WORDS[attrs["hair_colour"]])
    r = rng.random()
    f.hair = (f"{length} {colour} hair" if r < 0.6 else f"{colour} hair" if r < 0.8
              else f"{length} hair")
    if r < 0.6 or r >= 0.8:
      said["hair_length"] = attrs["hair_length"]
    if r < 0.8 and colour not in ("dark", "white"):   # "dark"/"white" hair are ambiguous
      said["hair_colour"] = attrs["hair_colour"]
  # Upper garment: always mentioned when visible (annotators rarely skip it).
  if vis["upper"] > 0 and rng.random() < 0.97:
    noun = _pick(rng, UPPER_WORDS[attrs["upper_type"]])
    if attrs["upper_type"] == "shirt" and female and rng.random() < 0.25:
      noun = "blouse"
    col = _colour(rng, attrs["upper_colour"], shade["upper"], slip_slot == "upper")
    said["upper_type"] = attrs["upper_type"]
    said["upper_colour"] = CONFUSABLE[attrs["upper_colour"]] if slip_slot == "upper" else \
        attrs["upper_colour"]
    pat = attrs["upper_pattern"]
    pre, post = "", ""
    if pat != "plain" and include("pattern", 0.8):
      said["upper_pattern"] = pat
      pc = attrs.get("pattern_colour")
      if pat == "stripes":
        two = pc is not None and rng.random() < 0.5
        if two:
          said["pattern_colour"] = pc
        if rng.random() < 0.5:
          pre = (f"{col} and {_pick(rng, COLOUR_WORDS[pc])} " if two
                 else f"{col} ") + _pick(rng, STRIPE_ADJ) + " "
          col = ""
        else:
          post = (f" with {_pick(rng, COLOUR_WORDS[pc])} stripes" if two
                  else " " + _pick(rng, STRIPE_POST))
      elif pat == "checks":
        if rng.random() < 0.6:
          pre = f"{col} {_pick(rng, CHECK_ADJ)} "
          col = ""
        else:
          post = " " + _pick(rng, CHECK_POST)
      else:
        if rng.random() < 0.3 and attrs["upper_type"] == "t-shirt":
          pre, noun = f"{col} graphic ", "tee"
          col = ""
        else:
          post = " " + _pick(rng, LOGO_POST)
    head = (pre + noun) if pre else (f"{col} {noun}")
    f.upper = _article(head.strip()) + post
  if include("lower", 0.85):
    noun, plural = _pick(rng, LOWER_WORDS[attrs["lower_type"]])
    col = _colour(rng, attrs["lower_colour"], shade["lower"], slip_slot == "lower")
    said["lower_type"] = attrs["lower_type"]
    said["lower_colour"] = CONFUSABLE[attrs["lower_colour"]] if slip_slot == "lower" else \
        attrs["lower_colour"]
    f.lower_bare = (col, noun, plural)
    if plural:
      f.lower = f"a pair of {col} {noun}" if rng.random() < 0.25 else f"{col} {noun}"
    else:
      f.lower = _article(f"{col} {noun}")
  if include("shoes", 0.6):
    noun = _pick(rng, SHOE_WORDS[attrs["shoe_type"]])
    col = _colour(rng, attrs["shoe_colour"], shade["shoes"], slip_slot == "shoes")
    if noun != "shoes":                        # plain "shoes" does not name the type
      said["shoe_type"] = attrs["shoe_type"]
    said["shoe_colour"] = CONFUSABLE[attrs["shoe_colour"]] if slip_slot == "shoes" else \
        attrs["shoe_colour"]
    f.shoes_bare = (col, noun)
    f.shoes = f"a pair of {col} {noun}" if rng.random() < 0.3 else f"{col} {noun}"
  if include("bag", 0.88):
    noun = _pick(rng, BAG_WORDS[attrs["bag"]])
    said["bag"] = attrs["bag"]
    if vis["bag"] < 1.0 and rng.random() < 0.6:
      f.bag = _article(noun)                       # partly visible: colour often unknown
    else:
      col = _colour(rng, attrs["bag_colour"], shade["bag"], slip_slot == "bag")
      said["bag_colour"] = CONFUSABLE[attrs["bag_colour"]] if slip_slot == "bag" else \
          attrs["bag_colour"]
      f.bag = _article(f"{col} {noun}")
    f.bag_kind = attrs["bag"]
  if include("headwear", 0.8):
    col = _colour(rng, attrs["headwear_colour"], shade["headwear"], False)
    f.headwear = _article(f"{col} {_pick(rng, HEADWEAR_WORDS[attrs['headwear']])}")
    said["headwear"], said["headwear_colour"] = attrs["headwear"], attrs["headwear_colour"]
  acc = attrs["accessory"]
  if acc != "none" and include("accessory", 0.75):
    said["accessory"] = acc
    if acc != "glasses":
      said["accessory_colour"] = attrs["accessory_colour"]
    if acc == "glasses":
      f.glasses = _pick(rng, ACCESSORY_WORDS["glasses"])
    else:
      col = _colour(rng, attrs["accessory_colour"], shade["accessory"], False)
      setattr(f, acc, _article(f"{col} {acc}"))
  if rng.random() < 0.3:
    f.view = view
  return f


def _join(items: list[str], rng: np.random.Generator) -> str:
  if len(items) == 1:
    return items[0]
  oxford = "," if rng.random() < 0.3 and len(items) > 2 else ""
  return ", ".join(items[:-1]) + f"{oxford} and " + items[-1]


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _view_sentence(view: str, pron: str, pos: str, rng) -> str:
  be, have = ("are", "have") if pron == "They" else ("is", "has")
  if view == "front":
    opts = (f"{pron} {be} facing the camera.", f"{pron} {be} walking towards the camera.")
  elif view == "back":
    opts = (f"{pron} {be} walking away from the camera.", f"{pron} {have} {pos} back to the camera.")
  else:
    opts = (f"{pron} {be} walking to the {view}.", f"{pron} {be} walking.")
  return _pick(rng, opts)


def _compose(f: _Facts, attrs: dict[str, Any], style: int, rng: np.random.Generator) -> str:
  """Assembles one caption from realised facts in one of several annotator styles."""
  female = attrs["gender"] == "female"
  if f.gendered:
    pron, pos = ("She", "her") if female else ("He", "his")
  else:
    pron, pos = ("The person", "their") if rng.random() < 0.5 else ("They", "their")
  build = f"{f.build} " if f.build else ""
  subj = f"{build}{f.subject}"
  worn_top = [x for x in (f.upper,) if x]
  worn_low = [x for x in (f.lower, f.shoes) if x]
  extras = []
  if f.headwear:
    extras.append(("wear", f"{f.headwear}" + (f" on {pos} head" if rng.random() < 0.4 else "")))
  if f.glasses:
    extras.append(("wear", f.glasses))
  if f.scarf:
    extras.append(("wear", f.scarf + (f" around {pos} neck" if rng.random() < 0.4 else "")))
  if f.bag:
    if f.bag_kind == "backpack" and rng.random() < 0.35:
      extras.append(("carry", f"{f.bag} on {pos} back"))
    elif f.bag_kind == "shoulder bag" and rng.random() < 0.35:
      extras.append(("carry", f"{f.bag} over {pos} shoulder"))
    else:
      extras.append(("carry", f.bag))
  if f.umbrella:
    extras.append(("hold", f.umbrella))
  be = "are" if pron == "They" else "is"
  sentences: list[str] = []
  if style == 0:
    # "A woman with long black hair is wearing a red t-shirt, blue jeans and white shoes."
    opener = _article(subj) if rng.random() < 0.7 else f"the {subj}"
    if f.hair:
      opener += f" with {f.hair}"
    items = worn_top + worn_low + [x for k, x in extras if k == "wear"]
    if items:
      sentences.append(f"{_cap(opener)} is wearing {_join(items, rng)}.")
    else:
      sentences.append(f"{_cap(opener)} is walking.")
    carry = [x for k, x in extras if k != "wear"]
    if carry:
      verb = _pick(rng, ("is carrying", "carries", "has")) if pron != "They" else "are carrying"
      sentences.append(f"{pron} {verb} {_join(carry, rng)}.")
  elif style == 1:
    # Short predicative sentences: "The man has short hair. His pants are black."
    idle = "is walking" if f.view or rng.random() < 0.5 else "is standing"
    sentences.append(f"The {subj} " + (f"has {f.hair}." if f.hair else f"{idle}."))
    if f.upper:
      sentences.append(f"{pron} {'wear' if pron == 'They' else 'wears'} {f.upper}.")
    if f.lower_bare:
      col, noun, plural = f.lower_bare
      sentences.append(f"{_cap(pos)} {noun} {'are' if plural else 'is'} {col}.")
    if f.shoes_bare:
      col, noun = f.shoes_bare
      sentences.append(f"{_cap(pos)} {noun} are {col}." if rng.random() < 0.6
                       else f"{pron} {be} wearing {col} {noun}.")
    for kind, x in extras:
      verb = {"wear": "is wearing", "carry": "is carrying", "hold": "is holding"}[kind]
      if pron == "They":
        verb = verb.replace("is", "are")
      sentences.append(f"{pron} {verb} {x}.")
  elif style == 2:
    # "This person is dressed in ... and ..., with ... . Carrying ..."
    opener = _pick(rng, ("This", "The", "A")) + f" {subj}"
    items = worn_top + ([f.lower] if f.lower else [])
    s = f"{opener} is dressed in {_join(items, rng)}" if items else f"{opener} is walking"
    if f.shoes:
      s += f", with {f.shoes}" + (f" on {pos} feet" if rng.random() < 0.3 else "")
    sentences.append(s + ".")
    if f.hair:
      sentences.append(f"{pron} {'have' if pron == 'They' else 'has'} {f.hair}.")
    if extras:
      parts = [("also wears " if k == "wear" else "carries " if k == "carry" else "holds ") + x
               for k, x in extras]
      if pron == "They":
        parts = [p.replace("wears", "wear").replace("carries", "carry").replace("holds", "hold")
                 for p in parts]
      sentences.append(f"{pron} " + _join(parts, rng) + ".")
  elif style == 3:
    # Terse: "A man in a black jacket and blue jeans, carrying a backpack."
    opener = _article(subj)
    if f.hair:
      opener += f" with {f.hair}"
    items = worn_top + worn_low
    s = f"{_cap(opener)} in {_join(items, rng)}" if items else _cap(opener)
    carry = [x for k, x in extras if k != "wear"]
    wear = [x for k, x in extras if k == "wear"]
    if wear:
      s += f", wearing {_join(wear, rng)}"
    if carry:
      s += f", {_pick(rng, ('carrying', 'with'))} {_join(carry, rng)}"
    sentences.append(s + ".")
  else:
    # Detailed top-to-bottom description (ICFG-like).
    opener = _article(subj)
    if f.hair:
      opener += f" with {f.hair}"
    s = f"{_cap(opener)}"
    wear_extra = [x for k, x in extras if k == "wear"]
    if f.upper:
      s += f" is wearing {f.upper}"
      if wear_extra:
        s += f" and {_join(wear_extra, rng)}"
      sentences.append(s + ".")
    elif wear_extra:
      sentences.append(s + f" is wearing {_join(wear_extra, rng)}.")
    else:
      sentences.append(s + " is walking.")
    if worn_low:
      low = _join(worn_low, rng)
      opts = [f"{pron} {'also ' if rng.random() < 0.4 else ''}"
              f"{'wear' if pron == 'They' else 'wears'} {low}.", f"{pron} {be} wearing {low}."]
      if f.lower:
        opts.append(f"On the lower body, {pos} clothing is {low}.")
      sentences.append(_pick(rng, opts))
    carry = [x for k, x in extras if k != "wear"]
    if carry:
      sentences.append(f"{pron} {be} carrying {_join(carry, rng)}.")
  if f.view:
    sentences.append(_view_sentence(f.view, pron, pos, rng))
  text = " ".join(sentences)
  # Annotator surface noise: occasional lowercase start / missing space after a period.
  r = rng.random()
  if r < 0.08:
    text = text[0].lower() + text[1:]
  elif r < 0.14:
    text = text.replace(". ", ".", 1)
  return text


def make_captions(attrs: dict[str, Any], hidden: dict[str, Any], vis: dict[str, float],
                  view: str, rng: np.random.Generator,
                  n: int) -> tuple[list[str], list[dict[str, Any]]]:
  """``n`` captions of one image (different annotator styles) and the slot values each states."""
  styles = rng.permutation(5)[:n]
  out, said = [], []
  for k in range(n):
    style = int(styles[k])
    detail = 1.25 if style == 4 else float(rng.uniform(0.75, 1.1))
    if n == 1:
      style, detail = (4 if rng.random() < 0.7 else style), 1.3
    f = _realise(attrs, hidden, vis, view, rng, detail)
    out.append(_compose(f, attrs, style, rng))
    said.append({k: f.mentioned[k] for k in sorted(f.mentioned)})
  return out, said
