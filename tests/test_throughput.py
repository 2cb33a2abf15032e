"""IRRA training FLOPs (hand counts, XLA's cost analysis), the peak table and MFU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from configs import base
from tipr_jax.methods import build_method
from tipr_jax.models.clip import CLIPConfig
from tipr_jax.training import throughput as tp


def test_peak_table_lookup():
  assert tp.peak_flops("TPU v4") == 275e12
  assert tp.peak_flops("TPU v5 lite") == 197e12
  assert tp.peak_flops("TPU v5p") == tp.peak_flops("TPU v5") == 459e12
  assert tp.peak_flops("TPU v6 lite") == 918e12
  assert tp.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert tp.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert tp.peak_flops("NVIDIA H100 NVL") == 835e12
  assert tp.peak_flops("NVIDIA H200") == 989e12
  assert tp.peak_flops("NVIDIA H200 141GB HBM3e") == 989e12  # unlisted suffix: the SXM part
  for unknown in ("cpu", "TPU v3", "NVIDIA A100-SXM4-80GB", ""):
    assert tp.peak_flops(unknown) is None
    assert tp.mfu(1e12, unknown) is None
  assert tp.mfu(98.9e12, "NVIDIA H100 80GB HBM3") == pytest.approx(0.1)
  assert tp.mfu(197e12 / 2, "TPU v5 lite") == pytest.approx(0.5)
  assert tp.mfu(1e9, jax.devices()[0].device_kind) is None  # the CPU here


def test_vit_b16_counts_by_hand():
  clip = CLIPConfig.vit_b16()
  d, L, n, V = 512, 77, 193, 49408
  # The reference: two text passes, MLM head on all 77 positions, 11003 CUHK identities.
  ref = tp.irra_forward_flops(clip, cmt_depth=4, num_classes=11003, mlm_positions=77,
                              masked_caption_for_global=False, text_length=77)
  assert ref["cross_attn"] == 4 * L * d * d + 4 * n * d * d + 4 * L * n * d
  assert ref["cross_modal_transformer"] == 4 * (24 * L * d * d + 4 * L * L * d)
  assert ref["mlm_head"] == 77 * (2 * d * d + 2 * d * V)
  assert ref["id_classifier"] == 4 * d * 11003
  # jax-stack.md, measured split of the reference: 34.5 + 2 x 6.0 + 0.3 + 2.0 + 3.9 + 0.02 GFLOP.
  for key, gflop, tol in (("image", 34.5, 0.1), ("text", 12.0, 0.1), ("cross_attn", 0.3, 0.02),
                          ("cross_modal_transformer", 2.0, 0.02), ("mlm_head", 3.9, 0.05),
                          ("id_classifier", 0.02, 0.003)):
    assert abs(ref[key] / 1e9 - gflop) < tol, (key, ref[key])
  train_ref = tp.train_flops_per_pair(clip, cmt_depth=4, num_classes=11003, mlm_positions=77,
                                      masked_caption_for_global=False, text_length=77)
  assert train_ref == 3 * sum(ref.values())
  assert abs(train_ref / 1e9 - 158) < 1.5  # "~158 GFLOP per pair for training"
  # This engine: one text pass, the head on 16 gathered positions.
  ours = tp.irra_forward_flops(clip, cmt_depth=4, num_classes=11003, mlm_positions=16,
                               text_length=77)
  assert ours["text"] == ref["text"] // 2
  assert ours["mlm_head"] == 16 * (2 * d * d + 2 * d * V)
  saved = sum(ref.values()) - sum(ours.values())
  assert abs(3 * saved / 1e9 - 28) < 2  # "Together ~28 GFLOP of the 158 per pair"


def test_from_config_and_switched_off_parts():
  clip = CLIPConfig.vit_b16()
  c = base.irra_config()
  full = tp.train_flops_per_pair(clip, cmt_depth=4, num_classes=100, mlm_positions=16,
                                 text_length=77)
  assert tp.train_flops_per_pair_from_config(c, clip, 100) == full
  c.mlm_positions_cap = 0  # 0: the full projection
  assert tp.train_flops_per_pair_from_config(c, clip, 100) == tp.train_flops_per_pair(
      clip, cmt_depth=4, num_classes=100, mlm_positions=77, text_length=77)
  c.losses.mlm = 0.0
  c.losses.id = 0.0
  no_heads = tp.irra_forward_flops(clip, cmt_depth=4, num_classes=0, mlm_positions=0,
                                   masked_caption_for_global=False, text_length=77)
  assert no_heads["cross_attn"] == no_heads["cross_modal_transformer"] == 0
  assert no_heads["mlm_head"] == no_heads["id_classifier"] == 0
  assert no_heads["text"] == tp.irra_forward_flops(
      clip, cmt_depth=4, num_classes=0, mlm_positions=16, text_length=77)["text"]
  assert tp.train_flops_per_pair_from_config(c, clip, 100) == 3 * sum(no_heads.values())


def test_bad_arguments_are_named():
  clip = CLIPConfig.tiny()
  with pytest.raises(ValueError, match="mlm_positions=20 exceeds text_length=16"):
    tp.irra_forward_flops(clip, cmt_depth=1, num_classes=4, mlm_positions=20, text_length=16)
  with pytest.raises(ValueError, match="text_length=0"):
    tp.irra_forward_flops(clip, cmt_depth=1, num_classes=4, mlm_positions=0, text_length=0)


def test_throughput_metrics():
  m = tp.throughput_metrics(80.0, num_devices=8, flops_per_pair=1e12, device_kind="TPU v5 lite")
  assert m["pairs_per_s_per_device"] == 10.0
  assert m["tflops_per_s"] == pytest.approx(80.0)
  assert m["tflops_per_s_per_device"] == pytest.approx(10.0)
  assert m["mfu"] == pytest.approx(10e12 / 197e12)
  assert "mfu" not in tp.throughput_metrics(8.0, num_devices=8, flops_per_pair=1e9,
                                            device_kind="cpu")


@pytest.mark.parametrize("masked_global", [True, False])
def test_matches_xla_cost_analysis(masked_global):
  """Ours (matmuls only) against XLA's count of the jitted forward and gradient of the method.

  Lowered-HLO cost analysis (no backend compilation: ~1 s here). Widths of 256 keep the
  elementwise work XLA also counts small. mlm_positions_cap = 0: XLA's count of a lax.cond is not
  the branch taken, so the capped head is checked by hand above.
  """
  c = base.irra_config()
  c.model.cmt_depth = 1
  c.mlm_positions_cap = 0
  c.masked_caption_for_global = masked_global
  L, B, classes = 16, 4, 64
  clip = CLIPConfig.tiny(vision_width=256, text_width=256, embed_dim=256, vision_layers=1,
                         text_layers=1, vision_heads=4, text_heads=4, vocab_size=2048,
                         context_length=L)
  method = build_method(c, clip_config=clip, num_classes=classes)
  h, w = clip.image_size
  batch = dict(images=jax.ShapeDtypeStruct((B, h, w, 3), jnp.float32),
               caption_ids=jax.ShapeDtypeStruct((B, L), jnp.int32),
               mlm_ids=jax.ShapeDtypeStruct((B, L), jnp.int32),
               mlm_labels=jax.ShapeDtypeStruct((B, L), jnp.int32),
               pids=jax.ShapeDtypeStruct((B,), jnp.int32))
  params = jax.eval_shape(method.init, jax.random.key(0))

  def objective(p, b):
    return method.loss(method.forward(p, b, None), b, 0)[0]

  fwd_xla = jax.jit(lambda p, b: method.forward(p, b, None)).lower(
      params, batch).cost_analysis()["flops"]
  train_xla = jax.jit(jax.grad(objective)).lower(params, batch).cost_analysis()["flops"]
  fwd = B * sum(tp.irra_forward_flops(clip, cmt_depth=1, num_classes=classes, mlm_positions=L,
                                      masked_caption_for_global=masked_global,
                                      text_length=L).values())
  train = B * tp.train_flops_per_pair(clip, cmt_depth=1, num_classes=classes, mlm_positions=L,
                                      masked_caption_for_global=masked_global, text_length=L)
  assert 1.0 <= fwd_xla / fwd < 1.03, (fwd_xla, fwd)  # XLA adds the elementwise ops
  # Backward: 2 matmuls per forward matmul, minus the input gradient of the patch embedding.
  assert 0.98 < train_xla / train < 1.03, (train_xla, train)
