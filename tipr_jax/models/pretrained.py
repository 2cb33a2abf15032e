"""Loading pretrained CLIP weights into `DualEncoder` params (strict, PyTorch-exact).

Sources, detected from `path`:
  (a) a Hugging Face CLIP directory: config.json + model.safetensors (read with
      safetensors.numpy, no torch) or pytorch_model.bin (needs torch);
  (b) an OpenAI CLIP checkpoint file (e.g. ViT-B-16.pt): a TorchScript archive
      or a plain state dict saved with torch.save (needs torch; loaded with
      torch.jit.load / torch.load(weights_only=True), never a general unpickle);
  (c) a directory written by `save_converted` (config.json + Orbax params).

Every source goes through one path: HF names are first mapped to OpenAI CLIP
names (q/k/v packed into in_proj), OpenAI names are mapped to Flax param
paths (Linear weights transposed, conv kernel OIHW -> HWIO), the visual
position embedding is resized to the configured grid, and every shape is
checked. Unmapped checkpoint tensors, missing params and shape mismatches raise
ValueError naming the key(s).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import zipfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tipr_jax.models.clip import CLIPConfig, DualEncoder

Params = dict[str, Any]
_log = logging.getLogger(__name__)

# Checkpoint entries that carry no model parameter.
_IGNORED_OPENAI = ("logit_scale", "input_resolution", "context_length", "vocab_size")
_IGNORED_HF = re.compile(r"^(logit_scale|(text|vision)_model\.embeddings\.position_ids)$")
_POS_KEY = "visual/positional_embedding"


# ----------------------------------------------------------------------------------------
# Position-embedding resizing (matches torch F.interpolate, align_corners=False).

def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic convolution weights for offsets t in [0,1): [..., 4] for taps -1..2."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def interpolation_matrix(n_in: int, n_out: int, method: str = "bilinear") -> np.ndarray:
  """[n_out, n_in] float64 matrix M with resized = M @ x along one axis.

  Same sampling as torch F.interpolate(size=..., align_corners=False):
  src = (dst + 0.5) * n_in / n_out - 0.5; bilinear clamps src at 0, bicubic
  uses Keys' kernel with a = -0.75 and border-replicated taps.
  """
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  dst = np.arange(n_out, dtype=np.float64)
  src = (dst + 0.5) * scale - 0.5
  rows = np.arange(n_out)
  if method == "bilinear":
    src = np.maximum(src, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
  elif method == "bicubic":
    i0 = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - i0, -0.75)
    for tap in range(4):
      idx = np.clip(i0 - 1 + tap, 0, n_in - 1)
      np.add.at(m, (rows, idx), w[:, tap])
  else:
    raise ValueError(f"pos_embed_interpolation must be 'bilinear' or 'bicubic', got {method!r}")
  return m


def resize_pos_embed(pos: np.ndarray, src_grid: tuple[int, int], dst_grid: tuple[int, int],
                     method: str = "bilinear") -> np.ndarray:
  """[1+sh*sw, D] -> [1+dh*dw, D]: CLS row kept, the (row-major) grid resized."""
  sh, sw = src_grid
  dh, dw = dst_grid
  if pos.ndim != 2 or pos.shape[0] != 1 + sh * sw:
    raise ValueError(f"position embedding of shape {pos.shape} does not hold 1+{sh}x{sw} tokens")
  if (sh, sw) == (dh, dw):
    return pos
  grid = pos[1:].astype(np.float64).reshape(sh, sw, -1)
  mh = interpolation_matrix(sh, dh, method)
  mw = interpolation_matrix(sw, dw, method)
  out = np.einsum("ah,bw,hwd->abd", mh, mw, grid).reshape(dh * dw, -1)
  return np.concatenate([pos[:1], out.astype(pos.dtype)], axis=0)


# ----------------------------------------------------------------------------------------
# Reading the files.

def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading PyTorch checkpoints needs torch; use a model.safetensors "
                      "checkpoint or a directory written by tipr_jax.models.convert") from e
  return torch


def _to_numpy(state: dict[str, Any], path: str) -> dict[str, np.ndarray]:
  """torch tensors -> numpy; floating tensors become float32."""
  torch = _torch()
  out = {}
  for k, v in state.items():
    if not isinstance(v, torch.Tensor):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor")
    v = v.detach().cpu()
    out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
  return out


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def read_openai_checkpoint(path: str) -> dict[str, np.ndarray]:
  """State dict (numpy) of an OpenAI CLIP .pt file: TorchScript archive or plain state dict."""
  torch = _torch()
  if _is_torchscript(path):
    state = torch.jit.load(path, map_location="cpu").state_dict()
  else:
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
      raise ValueError(f"{path}: not a TorchScript archive nor a weights-only state dict "
                       f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
      raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
  return _to_numpy(dict(state), path)


def read_hf_weights(directory: str) -> dict[str, np.ndarray]:
  """HF CLIPModel tensors from model.safetensors (preferred) or pytorch_model.bin."""
  st = os.path.join(directory, "model.safetensors")
  if os.path.exists(st):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
            for k, v in load_file(st).items()}
  if os.path.exists(os.path.join(directory, "model.safetensors.index.json")):
    raise ValueError(f"{directory}: sharded safetensors checkpoints are not supported")
  binf = os.path.join(directory, "pytorch_model.bin")
  if os.path.exists(binf):
    state = _torch().load(binf, map_location="cpu", weights_only=True)
    return _to_numpy(dict(state), binf)
  raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")


# ----------------------------------------------------------------------------------------
# Name mapping.

_HF_LAYER_RENAMES = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj",
}
_HF_SIMPLE = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_HF_LAYER = re.compile(r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)$")


def hf_to_openai(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames HF CLIPModel tensors to OpenAI CLIP names (q/k/v packed into in_proj)."""
  out: dict[str, np.ndarray] = {}
  qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  unmapped = []
  for k, v in hf.items():
    if _IGNORED_HF.match(k):
      continue
    if k in _HF_SIMPLE:
      out[_HF_SIMPLE[k]] = v
    elif k == "visual_projection.weight":
      out["visual.proj"] = v.T
    elif k == "text_projection.weight":
      out["text_projection"] = v.T
    elif (m := _HF_LAYER.match(k)):
      tower, layer, rest = m.groups()
      prefix = ("visual.transformer" if tower == "vision" else "transformer") + \
          f".resblocks.{layer}."
      am = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
      if am:
        qkv.setdefault((prefix, am.group(2)), {})[am.group(1)] = v
        continue
      for old, new in _HF_LAYER_RENAMES.items():
        if rest.startswith(old + "."):
          out[prefix + new + rest[len(old):]] = v
          break
      else:
        unmapped.append(k)
    else:
      unmapped.append(k)
  if unmapped:
    raise ValueError(f"unexpected checkpoint tensors (not part of a CLIP dual encoder): "
                     f"{sorted(unmapped)}")
  for (prefix, kind), parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      raise ValueError(f"{prefix}attn: q/k/v {kind} incomplete, found {sorted(parts)}")
    out[f"{prefix}attn.in_proj_{kind}"] = np.concatenate(
        [parts["q"], parts["k"], parts["v"]], axis=0)
  return out


def _t(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.T)


_BLOCK_MAP: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "attn.in_proj_weight": ("attn/in_proj_kernel", _t),
    "attn.in_proj_bias": ("attn/in_proj_bias", np.asarray),
    "attn.out_proj.weight": ("attn/out_proj/kernel", _t),
    "attn.out_proj.bias": ("attn/out_proj/bias", np.asarray),
    "ln_1.weight": ("ln_1/scale", np.asarray), "ln_1.bias": ("ln_1/bias", np.asarray),
    "ln_2.weight": ("ln_2/scale", np.asarray), "ln_2.bias": ("ln_2/bias", np.asarray),
    "mlp.c_fc.weight": ("mlp/c_fc/kernel", _t), "mlp.c_fc.bias": ("mlp/c_fc/bias", np.asarray),
    "mlp.c_proj.weight": ("mlp/c_proj/kernel", _t),
    "mlp.c_proj.bias": ("mlp/c_proj/bias", np.asarray),
}
_TOP_MAP: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "visual.conv1.weight": ("visual/conv1", lambda w: np.ascontiguousarray(
        w.transpose(2, 3, 1, 0))),
    "visual.class_embedding": ("visual/class_embedding", np.asarray),
    "visual.positional_embedding": (_POS_KEY, np.asarray),
    "visual.ln_pre.weight": ("visual/ln_pre/scale", np.asarray),
    "visual.ln_pre.bias": ("visual/ln_pre/bias", np.asarray),
    "visual.ln_post.weight": ("visual/ln_post/scale", np.asarray),
    "visual.ln_post.bias": ("visual/ln_post/bias", np.asarray),
    "visual.proj": ("visual/proj", np.asarray),
    "token_embedding.weight": ("text/token_embedding/embedding", np.asarray),
    "positional_embedding": ("text/positional_embedding", np.asarray),
    "ln_final.weight": ("text/ln_final/scale", np.asarray),
    "ln_final.bias": ("text/ln_final/bias", np.asarray),
    "text_projection": ("text/text_projection", np.asarray),
}
_OPENAI_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def openai_to_flat(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """OpenAI CLIP state dict -> ({flax path: array}, {flax path: source key})."""
  flat: dict[str, np.ndarray] = {}
  source: dict[str, str] = {}
  unmapped = []
  for k, v in state.items():
    if k in _IGNORED_OPENAI:
      continue
    if k in _TOP_MAP:
      path, fn = _TOP_MAP[k]
    elif (m := _OPENAI_BLOCK.match(k)) and m.group(3) in _BLOCK_MAP:
      tower = "visual" if m.group(1) else "text"
      sub, fn = _BLOCK_MAP[m.group(3)]
      path = f"{tower}/transformer/resblocks_{m.group(2)}/{sub}"
    else:
      unmapped.append(k)
      continue
    flat[path] = fn(np.asarray(v))
    source[path] = k
  if unmapped:
    raise ValueError(f"unexpected checkpoint tensors (not part of a CLIP dual encoder): "
                     f"{sorted(unmapped)}")
  return flat, source


def infer_openai_config(state: dict[str, np.ndarray], path: str
                        ) -> tuple[CLIPConfig, tuple[int, int] | None]:
  """CLIPConfig from OpenAI state-dict shapes (like CLIP's build_model) and the pos-emb grid.

  Heads are width // 64 (OpenAI's rule); stride = patch; image size = patch * grid.
  The grid is None when the position embedding is not a square grid.
  """
  need = ["visual.conv1.weight", "visual.positional_embedding", "text_projection",
          "positional_embedding", "token_embedding.weight", "ln_final.weight"]
  missing = [k for k in need if k not in state]
  if missing:
    raise ValueError(f"{path}: not an OpenAI CLIP ViT checkpoint, missing {missing}")
  conv = state["visual.conv1.weight"]
  vision_width, patch = int(conv.shape[0]), int(conv.shape[-1])
  n_pos = state["visual.positional_embedding"].shape[0] - 1
  grid = int(round(math.sqrt(n_pos)))
  square = grid * grid == n_pos
  if not square:  # e.g. a fine-tuned 24x8 checkpoint: the grid comes from config=
    grid = max(grid, 1)
  def count(prefix):
    return len({k.split(".")[len(prefix.split("."))] for k in state
                if k.startswith(prefix + ".") and k.endswith(".attn.in_proj_weight")})
  text_width = int(state["ln_final.weight"].shape[0])
  cfg = CLIPConfig(
      embed_dim=int(state["text_projection"].shape[1]),
      image_size=(patch * grid, patch * grid), patch_size=patch, stride_size=patch,
      vision_width=vision_width, vision_layers=count("visual.transformer.resblocks"),
      vision_heads=max(vision_width // 64, 1),
      context_length=int(state["positional_embedding"].shape[0]),
      vocab_size=int(state["token_embedding.weight"].shape[0]),
      text_width=text_width, text_layers=count("transformer.resblocks"),
      text_heads=max(text_width // 64, 1))
  return cfg, ((grid, grid) if square else None)


def hf_config(directory: str) -> tuple[CLIPConfig, tuple[int, int]]:
  """CLIPConfig and pos-emb grid from a HF CLIPModel config.json; checks QuickGELU / eps."""
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    c = json.load(f)
  if "vision_config" not in c or "text_config" not in c:
    raise ValueError(f"{path}: not a CLIPModel config (needs vision_config and text_config)")
  v, t = c["vision_config"], c["text_config"]
  for name, sub in (("vision_config", v), ("text_config", t)):
    act = sub.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
      raise ValueError(f"{path}: {name}.hidden_act is {act!r}; only 'quick_gelu' is supported")
    eps = sub.get("layer_norm_eps", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
      raise ValueError(f"{path}: {name}.layer_norm_eps is {eps}; only 1e-5 is supported")
    if sub.get("intermediate_size", 4 * sub["hidden_size"]) != 4 * sub["hidden_size"]:
      raise ValueError(f"{path}: {name}.intermediate_size must be 4 * hidden_size")
  size, patch = int(v.get("image_size", 224)), int(v.get("patch_size", 32))
  grid = size // patch
  cfg = CLIPConfig(
      embed_dim=int(c.get("projection_dim", 512)), image_size=(size, size),
      patch_size=patch, stride_size=patch, vision_width=int(v["hidden_size"]),
      vision_layers=int(v["num_hidden_layers"]), vision_heads=int(v["num_attention_heads"]),
      context_length=int(t.get("max_position_embeddings", 77)),
      vocab_size=int(t.get("vocab_size", 49408)), text_width=int(t["hidden_size"]),
      text_layers=int(t["num_hidden_layers"]), text_heads=int(t["num_attention_heads"]))
  return cfg, (grid, grid)


# ----------------------------------------------------------------------------------------
# Orbax (the project's checkpoint format), kept in two small helpers.

def _orbax_save(path: str, tree: Any) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), tree)
  ckptr.wait_until_finished()
  ckptr.close()


def _orbax_restore(path: str) -> Any:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  ckptr = ocp.StandardCheckpointer()
  try:
    return ckptr.restore(os.path.abspath(path))
  finally:
    ckptr.close()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(_flatten(v, p))
    else:
      out[p] = v
  return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for k, v in flat.items():
    node = tree
    *parents, leaf = k.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def save_converted(directory: str, config: CLIPConfig, params: Params) -> None:
  """Writes config.json (CLIPConfig.to_dict()) and params/ (Orbax) into `directory`."""
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, "params")
  if os.path.exists(target):
    raise FileExistsError(f"{target} already exists")
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2)
  _orbax_save(target, jax.tree_util.tree_map(np.asarray, params))


def _is_converted_dir(directory: str) -> bool:
  return os.path.isdir(os.path.join(directory, "params"))


def load_converted(directory: str) -> tuple[CLIPConfig, Params]:
  """(config, params) exactly as written by save_converted (no resizing)."""
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found")
  with open(cfg_path) as f:
    config = CLIPConfig.from_dict(json.load(f))
  params = _orbax_restore(os.path.join(directory, "params"))
  return config, jax.tree_util.tree_map(np.asarray, params)


# ----------------------------------------------------------------------------------------
# Loading.

def read_checkpoint(path: str) -> tuple[CLIPConfig, tuple[int, int], dict[str, np.ndarray],
                                        dict[str, str]]:
  """Any supported source -> (inferred config, pos-emb grid, {flax path: array}, {path: key})."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
  if os.path.isdir(path):
    if _is_converted_dir(path):
      config, params = load_converted(path)
      flat = _flatten(params)
      return config, config.grid_size, flat, {k: k for k in flat}
    if not os.path.exists(os.path.join(path, "config.json")):
      raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face CLIP directory "
                              f"or a directory written by tipr_jax.models.convert)")
    config, grid = hf_config(path)
    hf = read_hf_weights(path)
    flat, source = openai_to_flat(hf_to_openai(hf))
    return config, grid, flat, source
  state = read_openai_checkpoint(path)
  config, grid = infer_openai_config(state, path)
  flat, source = openai_to_flat(state)
  return config, grid, flat, source


def fit_params(flat: dict[str, np.ndarray], source: dict[str, str], src_grid: tuple[int, int],
               config: CLIPConfig, method: str = "bilinear") -> Params:
  """Checks checkpoint arrays against DualEncoder(config)'s params; resizes the pos-emb.

  Raises ValueError naming the key and both shapes on any mismatch, and listing
  missing or unexpected params.
  """
  model = DualEncoder(config)
  shapes = _flatten(model_param_shapes(model, config))
  flat = dict(flat)
  if _POS_KEY in flat and config.grid_size != tuple(src_grid):
    _log.info("resizing %s from grid %s to %s (%s)", source[_POS_KEY], tuple(src_grid),
              config.grid_size, method)
    flat[_POS_KEY] = resize_pos_embed(flat[_POS_KEY], src_grid, config.grid_size, method)
  missing = sorted(set(shapes) - set(flat))
  unexpected = sorted(source[k] for k in set(flat) - set(shapes))
  if missing or unexpected:
    raise ValueError(f"checkpoint does not fit the model: missing params {missing}, "
                     f"unexpected tensors {unexpected}")
  out = {}
  for k, shape in shapes.items():
    v = flat[k]
    if tuple(v.shape) != tuple(shape):
      raise ValueError(f"shape mismatch for checkpoint tensor {source[k]!r} (param {k}): "
                       f"checkpoint {tuple(v.shape)} vs model {tuple(shape)}")
    out[k] = jnp.asarray(v, dtype=jnp.float32)
  return _unflatten(out)


def model_param_shapes(model: DualEncoder, config: CLIPConfig) -> Params:
  """Param shapes of the model, without allocating (jax.eval_shape)."""
  h, w = config.image_size
  images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images, ids)
  return jax.tree_util.tree_map(lambda s: s.shape, variables["params"])


def load_checkpoint(path: str, *, image_size: tuple[int, int] | None = None,
                    config: CLIPConfig | None = None, dtype: str = "float32",
                    pos_embed_interpolation: str = "bilinear") -> tuple[CLIPConfig, Params]:
  """(config, params) from any supported checkpoint; image_size None keeps the checkpoint's.

  See from_pretrained for the rules.
  """
  path = os.fspath(path)
  interpolation_matrix(2, 1, pos_embed_interpolation)  # validates the method name early
  src_cfg, src_grid, flat, source = read_checkpoint(path)
  if src_grid is None:
    n = flat[_POS_KEY].shape[0]
    if config is None or config.num_image_tokens != n:
      raise ValueError(f"{path}: visual.positional_embedding has {n} rows, not 1 + a square "
                       f"grid; pass config= whose grid has {n - 1} patches")
    src_grid = config.grid_size
  if config is None:
    config = src_cfg.replace(dtype=dtype)
    if image_size is not None:
      config = config.replace(image_size=tuple(image_size))
  params = fit_params(flat, source, src_grid, config, pos_embed_interpolation)
  _log.info("loaded %d tensors from %s into DualEncoder(%s)", len(flat), path, config)
  return config, params


def from_pretrained(path: str, *, image_size: tuple[int, int] = (384, 128),
                    config: CLIPConfig | None = None, dtype: str = "float32",
                    pos_embed_interpolation: str = "bilinear") -> tuple[DualEncoder, Params]:
  """Loads a CLIP checkpoint as (DualEncoder, params) for model.apply({'params': params}, ...).

  Without `config`, shapes are inferred from the checkpoint and `image_size` /
  `dtype` are applied (stride = patch). With `config`, that config is used
  as is (its image_size, stride_size and dtype; the `image_size` / `dtype`
  arguments are ignored) and the checkpoint must fit it. The visual position
  embedding is resized from the checkpoint grid to the model grid (CLS kept,
  'bilinear' or 'bicubic' with torch's align_corners=False sampling). Params
  are float32.
  """
  config, params = load_checkpoint(path, image_size=image_size, config=config, dtype=dtype,
                                   pos_embed_interpolation=pos_embed_interpolation)
  return DualEncoder(config), params
