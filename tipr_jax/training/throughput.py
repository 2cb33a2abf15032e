"""Analytic training FLOPs of the IRRA method, accelerator peak FLOP/s, and MFU.

FLOPs count 2 per multiply-add of the matmuls only (tipr_jax/models/flops.py counts the CLIP
towers); LayerNorm, softmax, activations, embedding gathers and the losses' B x B similarity
matrices are left out (< 1 % at ViT-B/16 size). Training is counted as 3 x forward (forward +
backward), the usual convention of model FLOPs utilization: the extra forward that gradient
accumulation (config.train.grad_accum_steps > 1) recomputes is NOT counted, so MFU measures
useful work.

Per image-caption pair, forward (d = embed_dim, L = text length, N = image tokens):
  image tower                  vision_flops(clip)
  text tower                   text_flops(clip, L), twice if the global features use the clean
                               caption and the MLM branch the masked one
  cross-attention              4 L d^2 + 4 N d^2 + 4 L N d  (q/out from text, k/v from image)
  cross-modal transformer      cmt_depth x (24 L d^2 + 4 L^2 d)
  MLM head                     P x (2 d^2 + 2 d vocab) on the P positions it is applied to
  ID classifier                2 x 2 d num_classes (image and text features)
"""
from __future__ import annotations

from tipr_jax.models.clip import CLIPConfig
from tipr_jax.models.flops import text_flops, transformer_flops, vision_flops

# bf16 dense (no sparsity) peak FLOP/s per chip, keyed by jax.Device.device_kind.
# Sources: Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p,
# /v6e: 275, 197, 459, 918 TFLOP/s bf16 per chip); NVIDIA H100 and H200 Tensor Core GPU
# datasheets (BF16 Tensor Core 1,979 TFLOP/s "with sparsity" for SXM, i.e. 989 dense;
# H100 PCIe 1,513 sparse = 756 dense; H100 NVL / H200 NVL 1,671 sparse = 835 dense).
PEAK_FLOPS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,    # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,         # v5p (older jax releases report "TPU v5")
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,    # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,            # SXM
    "NVIDIA H200 NVL": 835e12,
}


def peak_flops(device_kind: str) -> float | None:
  """bf16 dense peak FLOP/s of one chip of `device_kind`, or None if not in PEAK_FLOPS.

  GPU kinds carry a memory suffix that varies by board ("NVIDIA H100 80GB HBM3", "NVIDIA H200
  141GB HBM3e" ...): an H100/H200 name not listed exactly takes the PCIe / NVL entry if it says
  so, else the SXM one.
  """
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  for gpu in ("H100", "H200"):
    if device_kind.startswith(f"NVIDIA {gpu}"):
      for variant in ("PCIe", "NVL"):
        if variant in device_kind and f"NVIDIA {gpu} {variant}" in PEAK_FLOPS:
          return PEAK_FLOPS[f"NVIDIA {gpu} {variant}"]
      return PEAK_FLOPS["NVIDIA H100 80GB HBM3" if gpu == "H100" else "NVIDIA H200"]
  return None


def mfu(achieved_flops_per_s_per_device: float, device_kind: str) -> float | None:
  """Model FLOPs utilization (0..1) of one device; None for a kind without a known peak (CPU)."""
  peak = peak_flops(device_kind)
  if peak is None:
    return None
  return float(achieved_flops_per_s_per_device) / peak


def irra_forward_flops(clip_config: CLIPConfig, *, cmt_depth: int, num_classes: int,
                       mlm_positions: int, masked_caption_for_global: bool = True,
                       text_length: int) -> dict[str, int]:
  """Forward FLOPs of one image-caption pair, by component (see the module docstring).

  mlm_positions: positions per caption the MLM head runs on (the engine: config.mlm_positions_cap
  when 0 < cap < text_length, else text_length; the reference: text_length); 0 = no MLM branch
  (no cross-modal layers, no second text pass). num_classes 0 = no ID classifier.
  """
  if text_length <= 0 or mlm_positions < 0 or num_classes < 0 or cmt_depth < 0:
    raise ValueError(f"text_length={text_length}, mlm_positions={mlm_positions}, "
                     f"num_classes={num_classes}, cmt_depth={cmt_depth}: expected text_length > 0 "
                     f"and the others >= 0")
  if mlm_positions > text_length:
    raise ValueError(f"mlm_positions={mlm_positions} exceeds text_length={text_length}")
  d, L, n = clip_config.embed_dim, text_length, clip_config.num_image_tokens
  mlm = mlm_positions > 0
  text_passes = 2 if (mlm and not masked_caption_for_global) else 1
  out = {
      "image": vision_flops(clip_config),
      "text": text_passes * text_flops(clip_config, length=L),
      "cross_attn": (4 * L * d * d + 4 * n * d * d + 4 * L * n * d) if mlm else 0,
      "cross_modal_transformer": transformer_flops(L, d, cmt_depth) if mlm else 0,
      "mlm_head": mlm_positions * (2 * d * d + 2 * d * clip_config.vocab_size),
      "id_classifier": 2 * 2 * d * num_classes,
  }
  return out


def train_flops_per_pair(clip_config: CLIPConfig, *, cmt_depth: int, num_classes: int,
                         mlm_positions: int, masked_caption_for_global: bool = True,
                         text_length: int) -> int:
  """Training FLOPs of one image-caption pair: 3 x the forward (see irra_forward_flops)."""
  fwd = irra_forward_flops(clip_config, cmt_depth=cmt_depth, num_classes=num_classes,
                           mlm_positions=mlm_positions,
                           masked_caption_for_global=masked_caption_for_global,
                           text_length=text_length)
  return 3 * sum(fwd.values())


def train_flops_per_pair_from_config(config, clip_config: CLIPConfig, num_classes: int) -> int:
  """train_flops_per_pair for an IRRA training config (losses switched off cost nothing)."""
  L = clip_config.context_length
  cap = int(config.mlm_positions_cap)
  positions = 0 if config.losses.mlm <= 0 else (cap if 0 < cap < L else L)
  return train_flops_per_pair(
      clip_config, cmt_depth=int(config.model.cmt_depth),
      num_classes=num_classes if config.losses.id > 0 else 0, mlm_positions=positions,
      masked_caption_for_global=bool(config.masked_caption_for_global), text_length=L)


def throughput_metrics(pairs_per_s: float, *, num_devices: int, flops_per_pair: float,
                       device_kind: str) -> dict[str, float]:
  """Logging figures from a measured global rate: pairs/s (total and per device), achieved
  TFLOP/s (total and per device), and `mfu` (0..1) when the device kind's peak is known."""
  per_device = pairs_per_s / num_devices
  out = {"pairs_per_s": pairs_per_s, "pairs_per_s_per_device": per_device,
         "tflops_per_s": pairs_per_s * flops_per_pair / 1e12,
         "tflops_per_s_per_device": per_device * flops_per_pair / 1e12}
  u = mfu(per_device * flops_per_pair, device_kind)
  if u is not None:
    out["mfu"] = u
  return out
