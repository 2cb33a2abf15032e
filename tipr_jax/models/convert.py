"""Converts a CLIP checkpoint (HF directory or OpenAI .pt) once into tipr_jax's format.

  python -m tipr_jax.models.convert --src=ViT-B-16.pt --out=pretrained/vit_b16

writes OUT/config.json (CLIPConfig.to_dict()) and OUT/params (Orbax), and
copies the tokenizer files found beside the source (HF vocab.json +
merges.txt [+ tokenizer json files], or OpenAI's bpe_simple_vocab_16e6.txt.gz).
The checkpoint's own resolution is kept unless --image_size is given;
from_pretrained(OUT, image_size=...) resizes the position embedding later.
"""
from __future__ import annotations

import argparse
import os
import shutil
from typing import Sequence

from tipr_jax.models.clip import CLIPConfig
from tipr_jax.models.pretrained import load_checkpoint, save_converted

HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json")
OPENAI_BPE = "bpe_simple_vocab_16e6.txt.gz"


def copy_tokenizer_files(src: str, out: str) -> list[str]:
  """Copies tokenizer files that lie in/beside `src` into `out`; returns their names."""
  folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
  names = HF_TOKENIZER_FILES if os.path.isdir(src) else (OPENAI_BPE,)
  copied = []
  for name in names:
    f = os.path.join(folder, name)
    if os.path.isfile(f):
      shutil.copy2(f, os.path.join(out, name))
      copied.append(name)
  return copied


def convert(src: str, out: str, image_size: tuple[int, int] | None = None,
            pos_embed_interpolation: str = "bilinear") -> CLIPConfig:
  """Reads `src`, writes the converted checkpoint to `out`; returns its config."""
  config, params = load_checkpoint(src, image_size=image_size,
                                   pos_embed_interpolation=pos_embed_interpolation)
  save_converted(out, config, params)
  copy_tokenizer_files(src, out)
  return config


def _size(s: str) -> tuple[int, int]:
  parts = s.replace("x", ",").split(",")
  if len(parts) != 2:
    raise argparse.ArgumentTypeError(f"--image_size must be H,W, got {s!r}")
  return int(parts[0]), int(parts[1])


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True, help="HF CLIP directory or OpenAI CLIP .pt file")
  parser.add_argument("--out", required=True, help="output directory (params/ must not exist)")
  parser.add_argument("--image_size", type=_size, default=None,
                      help="H,W to resize the position embedding to (default: keep)")
  parser.add_argument("--pos_embed_interpolation", default="bilinear",
                      choices=("bilinear", "bicubic"))
  args = parser.parse_args(argv)
  config = convert(args.src, args.out, args.image_size, args.pos_embed_interpolation)
  copied = [n for n in HF_TOKENIZER_FILES + (OPENAI_BPE,)
            if os.path.exists(os.path.join(args.out, n))]
  print(f"wrote {args.out}: {config}; tokenizer files: {copied or 'none found'}")


if __name__ == "__main__":
  main()
