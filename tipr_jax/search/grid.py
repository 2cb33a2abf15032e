"""The results picture: per query, its sentence on top and the top-k images in rank order.

Each image shows its rank and score underneath; when the query's identity is known, images of
that identity are outlined green and the others red (grey when unknown).
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from tipr_jax.search.query import QueryResult

HIT = (34, 139, 34)
MISS = (214, 39, 40)
UNKNOWN = (170, 170, 170)
INK = (20, 20, 20)
GREY = (105, 105, 105)
PANEL = (238, 238, 238)
BORDER = 5
GAP = 10
MARGIN = 16
MIN_WIDTH = 520  # room for the identity line and the legend when there are few results


def _font(size: int, bold: bool = False) -> ImageFont.ImageFont:
  """DejaVu Sans from matplotlib's data (always installed with it), else Pillow's default."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)
  except (ImportError, OSError):
    return ImageFont.load_default(size=size)


def _fit(img: Image.Image, box: tuple[int, int]) -> Image.Image:
  """`img` scaled to fit box (w, h), keeping its aspect ratio, centred on a light panel."""
  w, h = box
  scale = min(w / img.width, h / img.height)
  size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
  panel = Image.new("RGB", box, PANEL)
  panel.paste(img.resize(size, Image.BICUBIC), ((w - size[0]) // 2, (h - size[1]) // 2))
  return panel


def _placeholder(box: tuple[int, int], text: str) -> Image.Image:
  panel = Image.new("RGB", box, PANEL)
  d = ImageDraw.Draw(panel)
  d.text((box[0] // 2, box[1] // 2), text, fill=GREY, font=_font(12), anchor="mm")
  return panel


def _ellipsize(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength("…" + text, font=font) > width:
    text = text[1:]
  return "…" + text


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
  """Greedy word wrap to `width` pixels (a word longer than a line is cut by characters)."""
  lines, line = [], ""
  for word in text.split():
    cand = f"{line} {word}" if line else word
    if draw.textlength(cand, font=font) <= width:
      line = cand
      continue
    if line:
      lines.append(line)
    while draw.textlength(word, font=font) > width and len(word) > 1:
      cut = len(word) - 1
      while cut > 1 and draw.textlength(word[:cut], font=font) > width:
        cut -= 1
      lines.append(word[:cut])
      word = word[cut:]
    line = word
  if line:
    lines.append(line)
  return lines


def _identity_line(r: QueryResult) -> str:
  note = "; too long: only its start was read" if r.truncated else ""
  return _identity_text(r) + note


def _identity_text(r: QueryResult) -> str:
  if r.identity is None:
    return "identity unknown: images are not outlined"
  where = {"given": "given", "caption": "from the dataset caption"}.get(r.identity_source or "", "")
  hits = sum(bool(m.hit) for m in r.matches)
  parts = [f"identity {r.identity}" + (f" ({where})" if where else "")]
  if r.relevant is not None:
    parts.append(f"{hits} of its {r.relevant} gallery images in the top {len(r.matches)}")
  return "; ".join(parts)


def draw_grid(results: Sequence[QueryResult], image: Callable[[int], Image.Image],
              out: str | None = None, *, thumb: tuple[int, int] = (96, 192),
              per_row: int = 10) -> Image.Image:
  """The picture of `results` (one block per query); `image(i)` gives gallery image i.

  thumb: (width, height) of each image box. Saves to `out` (PNG) when given.
  """
  if not results:
    raise ValueError("no results to draw")
  tw, th = thumb
  cols = max(1, min(per_row, max(len(r.matches) for r in results)))
  cell_w, cell_h = tw + 2 * BORDER, th + 2 * BORDER
  width = max(MIN_WIDTH, 2 * MARGIN + cols * cell_w + (cols - 1) * GAP)
  f_query, f_small, f_rank = _font(16, bold=True), _font(12), _font(13, bold=True)
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  caption_h = 36
  blocks = []
  for qi, r in enumerate(results):
    prefix = f"{qi + 1}. " if len(results) > 1 else ""
    lines = _wrap(measure, f"{prefix}“{r.query}”", f_query, width - 2 * MARGIN)
    id_lines = _wrap(measure, _identity_line(r), f_small, width - 2 * MARGIN)
    rows = max(1, -(-len(r.matches) // cols))
    head_h = len(lines) * 21 + len(id_lines) * 16 + 6
    blocks.append((r, lines, id_lines, rows, head_h, head_h + rows * (cell_h + caption_h) + GAP))
  has_identity = any(r.identity is not None for r in results)
  legend_h = 26 if has_identity else 22
  height = 2 * MARGIN + sum(b[-1] for b in blocks) + legend_h
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  y = MARGIN
  missing = []
  for bi, (r, lines, id_lines, rows, head_h, block_h) in enumerate(blocks):
    if bi:  # a rule between query blocks
      draw.line([MARGIN, y - GAP // 2 - 4, width - MARGIN, y - GAP // 2 - 4], fill=PANEL, width=2)
    for i, line in enumerate(lines):
      draw.text((MARGIN, y + 21 * i), line, fill=INK, font=f_query)
    for i, line in enumerate(id_lines):
      draw.text((MARGIN, y + 21 * len(lines) + 2 + 16 * i), line, fill=GREY, font=f_small)
    top = y + head_h
    for m in r.matches:
      row, col = divmod(m.rank - 1, cols)
      x0 = MARGIN + col * (cell_w + GAP)
      y0 = top + row * (cell_h + caption_h)
      try:
        pic = _fit(image(m.index), (tw, th))
      except (OSError, KeyError, ValueError) as e:
        pic = _placeholder((tw, th), "image missing")
        missing.append(f"{m.file} ({type(e).__name__})")
      colour = UNKNOWN if m.hit is None else (HIT if m.hit else MISS)
      draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], fill=colour)
      canvas.paste(pic, (x0 + BORDER, y0 + BORDER))
      draw.text((x0, y0 + cell_h + 3), f"#{m.rank}", fill=INK, font=f_rank)
      draw.text((x0 + cell_w, y0 + cell_h + 4), f"{m.score:.3f}", fill=INK, font=f_small,
                anchor="ra")
      label = f"id {m.identity}" if m.identity is not None else os.path.basename(m.file)
      draw.text((x0, y0 + cell_h + 19), _ellipsize(draw, label, f_small, cell_w), fill=GREY,
                font=f_small)
    y += block_h
  x = MARGIN
  if has_identity:
    for colour, text in ((HIT, "same identity as the query"), (MISS, "another identity")):
      draw.rectangle([x, y + 4, x + 14, y + 18], fill=colour)
      draw.text((x + 20, y + 4), text, fill=INK, font=f_small)
      x += 40 + int(draw.textlength(text, font=f_small))
  note = "score: cosine similarity"
  if x + draw.textlength(note, font=f_small) <= width - MARGIN:
    draw.text((width - MARGIN, y + 4), note, fill=GREY, font=f_small, anchor="ra")
  if missing:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    warnings.warn(f"{len(missing)} result image(s) could not be read for the picture (drawn as "
                  f"'image missing'): {shown}. Were the gallery images moved after indexing?")
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    canvas.save(out)
  return canvas
