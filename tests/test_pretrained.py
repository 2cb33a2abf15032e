"""Pretrained loading: parity with PyTorch (HF and OpenAI formats), strictness, converter."""
from __future__ import annotations

from collections import OrderedDict
import gzip
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F
import transformers

from tipr_jax.models import CLIPConfig, DualEncoder, from_pretrained
from tipr_jax.models import convert, pretrained

torch.set_num_threads(2)

# --- A small PyTorch CLIP with OpenAI CLIP's structure and state-dict names (reference written
# for these tests from irra-reference.md §2.1; non-square input, resized pos-emb, proj on all tokens).


class QuickGELU(nn.Module):

  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):

  def __init__(self, d: int, heads: int):
    super().__init__()
    self.attn = nn.MultiheadAttention(d, heads)
    self.ln_1 = nn.LayerNorm(d)
    self.mlp = nn.Sequential(OrderedDict([
        ("c_fc", nn.Linear(d, 4 * d)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * d, d))]))
    self.ln_2 = nn.LayerNorm(d)

  def forward(self, x, mask=None):  # x: [L, B, D] (torch MHA default layout)
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
    return x + self.mlp(self.ln_2(x))


class Tower(nn.Module):

  def __init__(self, d: int, layers: int, heads: int):
    super().__init__()
    self.resblocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])

  def forward(self, x, mask=None):
    for b in self.resblocks:
      x = b(x, mask)
    return x


class Visual(nn.Module):

  def __init__(self, grid: int, patch: int, stride: int, width: int, layers: int, heads: int,
               out: int):
    super().__init__()
    self.patch, self.stride = patch, stride
    self.conv1 = nn.Conv2d(3, width, patch, stride, bias=False)
    self.class_embedding = nn.Parameter(torch.randn(width))
    self.positional_embedding = nn.Parameter(torch.randn(1 + grid * grid, width))
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = Tower(width, layers, heads)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(torch.randn(width, out))

  def resized_pos(self, gh: int, gw: int, mode: str = "bilinear"):
    """IRRA's resize_pos_embed: CLS kept, grid interpolated with align_corners=False."""
    pos = self.positional_embedding
    g = int(round((pos.shape[0] - 1) ** 0.5))
    if (g, g) == (gh, gw):
      return pos
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode=mode, align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)], dim=0)

  def forward(self, images, mode: str = "bilinear"):  # images: NCHW
    x = self.conv1(images)
    b, d, gh, gw = x.shape
    x = x.reshape(b, d, gh * gw).permute(0, 2, 1)
    x = torch.cat([self.class_embedding.expand(b, 1, d), x], dim=1)
    x = x + self.resized_pos(gh, gw, mode)
    x = self.ln_pre(x)
    x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    return self.ln_post(x) @ self.proj


class OpenAICLIP(nn.Module):
  """forward(images NCHW, text [B,L]) -> (image tokens [B,N,E], text tokens [B,L,E])."""

  def __init__(self, *, embed: int, grid: int, patch: int, vision_width: int,
               vision_layers: int, vision_heads: int, ctx: int, vocab: int, text_width: int,
               text_layers: int, text_heads: int, stride: int | None = None):
    super().__init__()
    self.visual = Visual(grid, patch, stride or patch, vision_width, vision_layers,
                         vision_heads, embed)
    self.token_embedding = nn.Embedding(vocab, text_width)
    self.positional_embedding = nn.Parameter(torch.randn(ctx, text_width))
    self.transformer = Tower(text_width, text_layers, text_heads)
    self.ln_final = nn.LayerNorm(text_width)
    self.text_projection = nn.Parameter(torch.randn(text_width, embed))
    self.logit_scale = nn.Parameter(torch.tensor(4.6))

  def encode_text(self, text):
    length = text.shape[1]
    x = self.token_embedding(text) + self.positional_embedding[:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = self.transformer(x.permute(1, 0, 2), mask).permute(1, 0, 2)
    return self.ln_final(x) @ self.text_projection

  def forward(self, images, text):
    return self.visual(images), self.encode_text(text)


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0, std: float = 0.02) -> None:
  """Random values everywhere (LayerNorm scales around 1), so no mapping error can hide."""
  g = torch.Generator().manual_seed(seed)
  for name, p in module.named_parameters():
    noise = torch.randn(p.shape, generator=g)
    if isinstance(p, nn.Parameter) and p.ndim == 1 and ("ln" in name or "norm" in name) \
        and name.endswith("weight"):
      p.copy_(1.0 + 0.1 * noise)
    elif "embedding" in name:
      p.copy_(0.1 * noise)
    else:
      p.copy_(std * noise)


# --- helpers ------------------------------------------------------------------------------

def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nchw(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def captions(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
  """Random ids in [1, vocab-2], an EOT (= vocab-1, the largest id) at a random position, 0 after."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab - 1, size=(batch, length))
  for b in range(batch):
    eot = rng.integers(2, length)
    ids[b, eot] = vocab - 1
    ids[b, eot + 1:] = 0
  return ids.astype(np.int32)


def jax_outputs(model: DualEncoder, params, images: np.ndarray, ids: np.ndarray):
  out = jax.jit(model.apply)({"params": params}, images, ids)
  return {k: np.asarray(v) for k, v in out.items()}


TINY_HF = dict(
    projection_dim=24,
    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8,
                       hidden_act="quick_gelu", layer_norm_eps=1e-5),
    text_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=16, vocab_size=100,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2,
                     bos_token_id=0, pad_token_id=1))


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  model = transformers.CLIPModel(transformers.CLIPConfig(**TINY_HF)).eval()
  randomize(model, seed=1)
  return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
  d = tmp_path_factory.mktemp("hf_clip")
  hf_model.save_pretrained(d)
  (d / "vocab.json").write_text('{"a": 0}')
  (d / "merges.txt").write_text("#version: 0.2\n")
  return str(d)


@torch.no_grad()
def hf_reference(model, images: np.ndarray, ids: np.ndarray, interpolate: bool = False):
  """Token and global features from HF, ln_post/ln_final + projection applied to all tokens."""
  vis = model.vision_model(pixel_values=nchw(images), interpolate_pos_encoding=interpolate)
  img_tokens = model.visual_projection(model.vision_model.post_layernorm(vis.last_hidden_state))
  img_feats = model.get_image_features(pixel_values=nchw(images),
                                       interpolate_pos_encoding=interpolate).pooler_output
  txt = model.text_model(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
  txt_tokens = model.text_projection(model.text_model.final_layer_norm(txt.hidden_states[-1]))
  txt_feats = model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output
  return dict(image_tokens=img_tokens.numpy(), image_feats=img_feats.numpy(),
              text_tokens=txt_tokens.numpy(), text_feats=txt_feats.numpy())


def assert_parity(ours: dict, ref: dict, tol: float = 1e-5) -> dict:
  errs = {k: rel_err(ours[k], ref[k]) for k in ref}
  for k, e in errs.items():
    assert ours[k].shape == ref[k].shape, (k, ours[k].shape, ref[k].shape)
    assert e < tol, f"{k}: relative error {e:.2e} >= {tol}"
  return errs


# --- resize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("src,dst", [((14, 14), (24, 8)), ((4, 4), (6, 2)), ((3, 5), (7, 5)),
                                     ((7, 7), (7, 7))])
def test_resize_pos_embed_matches_torch_interpolate(method, src, dst):
  rng = np.random.default_rng(0)
  pos = rng.standard_normal((1 + src[0] * src[1], 16)).astype(np.float32)
  ours = pretrained.resize_pos_embed(pos, src, dst, method)
  grid = torch.from_numpy(pos[1:]).reshape(1, *src, 16).permute(0, 3, 1, 2)
  ref = F.interpolate(grid, size=dst, mode=method, align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(-1, 16).numpy()
  np.testing.assert_array_equal(ours[0], pos[0])
  # torch interpolates in float32, ours in float64: rounding-level differences only.
  np.testing.assert_allclose(ours[1:], ref, rtol=0, atol=5e-6)


# --- Hugging Face format -------------------------------------------------------------------

def test_hf_parity_float32(hf_model, hf_dir):
  model, params = from_pretrained(hf_dir, image_size=(32, 32))
  c = model.config
  assert (c.embed_dim, c.vision_width, c.vision_heads, c.text_width, c.text_heads,
          c.context_length, c.vocab_size) == (24, 64, 4, 32, 2, 16, 100)
  images = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
  ids = captions(3, 16, 100)
  errs = assert_parity(jax_outputs(model, params, images, ids),
                       hf_reference(hf_model, images, ids))
  print("HF parity rel errors:", errs)


def test_hf_parity_nonsquare_bicubic(hf_model, hf_dir):
  """HF's own non-square path (interpolate_pos_encoding: bicubic) vs our bicubic resize."""
  model, params = from_pretrained(hf_dir, image_size=(48, 24), pos_embed_interpolation="bicubic")
  assert model.config.grid_size == (6, 3)
  images = np.random.default_rng(1).standard_normal((2, 48, 24, 3)).astype(np.float32)
  ids = captions(2, 16, 100, seed=1)
  assert_parity(jax_outputs(model, params, images, ids),
                hf_reference(hf_model, images, ids, interpolate=True))


def test_hf_pytorch_model_bin_equals_safetensors(hf_model, hf_dir, tmp_path):
  (tmp_path / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
  torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
  _, from_bin = from_pretrained(str(tmp_path), image_size=(32, 32))
  _, from_st = from_pretrained(hf_dir, image_size=(32, 32))
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_bin, from_st)


def test_hf_rejects_gelu_config(hf_dir, tmp_path):
  cfg = json.load(open(os.path.join(hf_dir, "config.json")))
  cfg["vision_config"]["hidden_act"] = "gelu"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  os.symlink(os.path.join(hf_dir, "model.safetensors"), tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match="hidden_act"):
    from_pretrained(str(tmp_path), image_size=(32, 32))


# --- OpenAI format ------------------------------------------------------------------------

TINY_OPENAI = dict(embed=24, grid=4, patch=8, vision_width=128, vision_layers=2, vision_heads=2,
                   ctx=16, vocab=100, text_width=64, text_layers=2, text_heads=1)


@pytest.fixture(scope="module")
def openai_model():
  torch.manual_seed(0)
  m = OpenAICLIP(**TINY_OPENAI).eval()
  randomize(m, seed=2)
  return m


def openai_state(model: nn.Module) -> dict[str, torch.Tensor]:
  """The model's state dict plus the scalar entries OpenAI's archives carry."""
  sd = dict(model.state_dict())
  sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16),
            vocab_size=torch.tensor(100))
  return sd


@torch.no_grad()
def openai_reference(model: OpenAICLIP, images: np.ndarray, ids: np.ndarray, mode="bilinear"):
  img, txt = model.visual(nchw(images), mode), model.encode_text(torch.from_numpy(ids).long())
  t_idx = torch.from_numpy(ids).long().argmax(-1)
  return dict(image_tokens=img.numpy(), image_feats=img[:, 0].numpy(), text_tokens=txt.numpy(),
              text_feats=txt[torch.arange(len(ids)), t_idx].numpy())


def test_openai_state_dict_and_torchscript_parity(openai_model, tmp_path):
  plain = tmp_path / "plain.pt"
  torch.save(openai_state(openai_model), plain)

  class Traced(nn.Module):  # same state-dict keys as OpenAICLIP, plus the scalar buffers

    def __init__(self, m):
      super().__init__()
      for name, child in m.named_children():
        self.add_module(name, child)
      self.positional_embedding = m.positional_embedding
      self.text_projection = m.text_projection
      self.logit_scale = m.logit_scale
      self.register_buffer("input_resolution", torch.tensor(32))

    def forward(self, images, text):  # tracing only needs some graph; the weights are the point
      return self.visual.conv1(images), self.token_embedding(text)

  traced_mod = Traced(openai_model)
  ts = tmp_path / "ViT-tiny.pt"
  example = (torch.zeros(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.long))
  torch.jit.save(torch.jit.trace(traced_mod, example), str(ts))
  assert pretrained._is_torchscript(str(ts)) and not pretrained._is_torchscript(str(plain))

  images = np.random.default_rng(2).standard_normal((2, 48, 16, 3)).astype(np.float32)
  ids = captions(2, 16, 100, seed=2)
  ref = openai_reference(openai_model, images, ids)
  loaded = []
  for path in (plain, ts):
    model, params = from_pretrained(str(path), image_size=(48, 16))
    assert model.config.grid_size == (6, 2)
    assert (model.config.vision_heads, model.config.text_heads) == (2, 1)
    errs = assert_parity(jax_outputs(model, params, images, ids), ref)
    print(path.name, "parity rel errors:", errs)
    loaded.append(params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[0], loaded[1])


def test_openai_overlapping_stride_parity(tmp_path):
  """stride < patch (IRRA's stride_size option): conv path against torch Conv2d."""
  torch.manual_seed(0)
  ref_model = OpenAICLIP(**TINY_OPENAI, stride=6).eval()
  randomize(ref_model, seed=3)
  path = tmp_path / "s6.pt"
  torch.save(openai_state(ref_model), path)
  config = CLIPConfig(embed_dim=24, image_size=(44, 20), patch_size=8, stride_size=6,
                      vision_width=128, vision_layers=2, vision_heads=2, context_length=16,
                      vocab_size=100, text_width=64, text_layers=2, text_heads=1)
  assert config.grid_size == (7, 3)
  model, params = from_pretrained(str(path), config=config)
  images = np.random.default_rng(3).standard_normal((2, 44, 20, 3)).astype(np.float32)
  ids = captions(2, 12, 100, seed=3)  # shorter than the context: pos-emb sliced
  assert_parity(jax_outputs(model, params, images, ids), openai_reference(ref_model, images, ids))


def test_full_size_vit_b16_384x128(tmp_path):
  """ViT-B/16 with a 14x14 (224) pos-emb, fp16 checkpoint, loaded at 384x128 (grid 24x8)."""
  t0 = time.time()
  torch.manual_seed(0)
  ref_model = OpenAICLIP(embed=512, grid=14, patch=16, vision_width=768, vision_layers=12,
                         vision_heads=12, ctx=77, vocab=49408, text_width=512, text_layers=12,
                         text_heads=8).eval()
  randomize(ref_model, seed=4)
  with torch.no_grad():  # an fp16 checkpoint, like OpenAI's; the reference uses the same values
    for p in ref_model.parameters():
      p.copy_(p.half().float())
  path = tmp_path / "ViT-B-16.pt"
  torch.save({k: v.half() for k, v in openai_state(ref_model).items()}, path)
  model, params = from_pretrained(str(path))
  assert model.config == CLIPConfig.vit_b16()
  images = np.random.default_rng(4).standard_normal((1, 384, 128, 3)).astype(np.float32)
  ids = captions(1, 77, 49408, seed=4)
  errs = assert_parity(jax_outputs(model, params, images, ids),
                       openai_reference(ref_model, images, ids))
  print("ViT-B/16 384x128 rel errors:", errs, f"({time.time() - t0:.1f} s)")


# --- strictness and errors ----------------------------------------------------------------

def test_shape_mismatch_names_key_and_shapes(hf_dir):
  config = CLIPConfig(embed_dim=24, image_size=(32, 32), patch_size=8, stride_size=8,
                      vision_width=64, vision_layers=2, vision_heads=4, context_length=16,
                      vocab_size=200, text_width=32, text_layers=2, text_heads=2)
  with pytest.raises(ValueError, match=r"token_embedding\.weight.*\(100, 32\).*\(200, 32\)"):
    from_pretrained(hf_dir, config=config)
  with pytest.raises(ValueError, match=r"missing params.*resblocks_2"):
    from_pretrained(hf_dir, config=config.replace(vocab_size=100, vision_layers=3))


def test_unexpected_and_missing_tensors(openai_model, tmp_path):
  sd = openai_state(openai_model)
  extra = tmp_path / "extra.pt"
  torch.save({**sd, "visual.adapter.weight": torch.zeros(3)}, extra)
  with pytest.raises(ValueError, match=r"visual\.adapter\.weight"):
    from_pretrained(str(extra))
  missing = tmp_path / "missing.pt"
  torch.save({k: v for k, v in sd.items() if k != "transformer.resblocks.1.mlp.c_fc.bias"},
             missing)
  with pytest.raises(ValueError, match=r"text/transformer/resblocks_1/mlp/c_fc/bias"):
    from_pretrained(str(missing))


def test_missing_path_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.pt"):
    from_pretrained(str(tmp_path / "nowhere.pt"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="pos_embed_interpolation"):
    from_pretrained(str(tmp_path), pos_embed_interpolation="nearest")


# --- converter ------------------------------------------------------------------------------

def test_converter_cli_round_trip(hf_dir, tmp_path):
  out = tmp_path / "converted"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-m", "tipr_jax.models.convert", f"--src={hf_dir}",
                        f"--out={out}"], capture_output=True, text=True, env=env, timeout=300)
  assert res.returncode == 0, res.stderr
  assert (out / "vocab.json").exists() and (out / "merges.txt").exists()
  assert CLIPConfig.from_dict(json.load(open(out / "config.json"))).image_size == (32, 32)
  for size in [(32, 32), (48, 16)]:
    _, direct = from_pretrained(hf_dir, image_size=size)
    model, conv = from_pretrained(str(out), image_size=size)
    assert model.config.image_size == size
    jax.tree_util.tree_map(np.testing.assert_array_equal, direct, conv)


def test_converter_main_openai_copies_bpe(openai_model, tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  torch.save(openai_state(openai_model), src / "ViT-tiny.pt")
  with gzip.open(src / convert.OPENAI_BPE, "wt") as f:
    f.write("bpe\n")
  out = tmp_path / "out"
  convert.main([f"--src={src / 'ViT-tiny.pt'}", f"--out={out}", "--image_size=48,16"])
  assert (out / convert.OPENAI_BPE).exists()
  config, params = pretrained.load_converted(str(out))
  assert config.image_size == (48, 16)
  _, direct = from_pretrained(str(src / "ViT-tiny.pt"), image_size=(48, 16))
  jax.tree_util.tree_map(np.testing.assert_array_equal, direct, params)
  with pytest.raises(FileExistsError):
    convert.main([f"--src={src / 'ViT-tiny.pt'}", f"--out={out}"])
