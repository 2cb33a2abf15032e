"""The benchmark's analytic IRRA FLOPs against hand counts and XLA's cost analysis (tiny config)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import irra_flops
from configs import base
from tipr_jax.methods import build_method
from tipr_jax.models.clip import CLIPConfig
from tipr_jax.models.flops import text_flops
from tipr_jax.models.irra import IRRA

# Wide enough that the elementwise work XLA also counts (softmax, LayerNorm, log-softmax) stays < 2%.
CFG = CLIPConfig.tiny(vision_width=384, text_width=384, embed_dim=384, vision_layers=1, text_layers=1,
                      vision_heads=6, text_heads=6, context_length=32, vocab_size=4096)
B, CLASSES, DEPTH = 4, 100, 1


def _xla_flops(fn, *args) -> float:
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def _method(cap: int):
  c = base.irra_config()
  c.model.cmt_depth = DEPTH
  c.mlm_positions_cap = cap
  return build_method(c, clip_config=CFG, num_classes=CLASSES)


def _batch_spec():
  s = jax.ShapeDtypeStruct
  h, w = CFG.image_size
  ids = s((B, CFG.context_length), jnp.int32)
  return dict(images=s((B, h, w, 3), jnp.float32), caption_ids=ids, mlm_ids=ids, mlm_labels=ids,
              pids=s((B,), jnp.int32))


def test_hand_counts_full_size():
  c = CLIPConfig.vit_b16()
  h = irra_flops.head_flops(c, cmt_depth=4, num_classes=11003, mlm_positions=77, batch=8)
  d, l, n, v = 512, 77, 193, 49408
  assert h["cross_attn"] == 2 * l * d * d + 2 * n * d * 2 * d + 2 * 2 * l * n * d + 2 * l * d * d
  assert h["cmt"] == 4 * (24 * l * d * d + 4 * l * l * d)
  assert h["mlm_head"] == 2 * l * d * d + 2 * l * d * v
  assert h["classifier"] == 2 * 2 * d * 11003
  ref = irra_flops.pair_flops(c, mlm_positions=None, text_passes=2)
  # jax-stack.md: the reference spends 52.8 GFLOP forward, ~158 for training, per pair.
  assert abs(ref["forward"] / 1e9 - 52.8) < 0.05 and abs(ref["train"] / 1e9 - 158.2) < 0.1
  ours = irra_flops.pair_flops(c, mlm_positions=16, text_passes=1)
  # Our savings: one text pass fewer, and the MLM head on 16 positions instead of 77.
  saving = text_flops(c) + irra_flops.mlm_head_flops(77 - 16, 512, 49408)
  assert ref["forward"] - ours["forward"] == float(saving)


def test_forward_and_train_match_xla_without_cap():
  """Whole IRRA forward and gradient (MLM head on all positions: no lax.cond) vs XLA."""
  m = _method(cap=0)
  batch = _batch_spec()
  params = jax.eval_shape(m.init, jax.random.key(0))
  fwd = _xla_flops(lambda p, b: m.forward(p, b, None), params, batch)
  grad = _xla_flops(jax.grad(lambda p, b: m.loss(m.forward(p, b, None), b, 0)[0]), params, batch)
  ours = irra_flops.pair_flops(CFG, cmt_depth=DEPTH, num_classes=CLASSES,
                               mlm_positions=CFG.context_length, batch=B)
  for name, xla, mine in (("forward", fwd, B * ours["forward"]), ("train", grad, B * ours["train"])):
    assert mine <= xla, (name, mine, xla)
    assert xla / mine - 1 < 0.02, (name, mine, xla)


def test_capped_mlm_head_matches_xla():
  """The head on `cap` gathered positions per caption costs mlm_head_flops(cap)."""
  cap = 6
  m = _method(cap=cap)
  params = jax.eval_shape(m.init, jax.random.key(0))
  x = jax.ShapeDtypeStruct((B, cap, CFG.embed_dim), jnp.float32)
  xla = _xla_flops(lambda p, x: m.model.apply({"params": p}, x, method=IRRA.mlm_scores), params, x)
  mine = B * irra_flops.mlm_head_flops(cap, CFG.embed_dim, CFG.vocab_size)
  assert mine <= xla and xla / mine - 1 < 0.02, (mine, xla)


def test_torch_baseline_computes_the_reference_flops():
  """The PyTorch baseline (two text passes, MLM head on all positions) matches the analytic count
  exactly: torch's FlopCounterMode, with the math attention path so QK^T/AV are counted too."""
  import torch
  from torch.nn.attention import SDPBackend, sdpa_kernel
  from torch.utils.flop_counter import FlopCounterMode

  from benchmarks import irra_torch
  from benchmarks.train_step import make_batch

  cfg = CLIPConfig.tiny(vision_width=64, text_width=32, embed_dim=32, vocab_size=500)
  torch.manual_seed(0)
  model = irra_torch.IRRATorch(cfg, num_classes=10, cmt_depth=2)
  batch = irra_torch.to_torch_batch(make_batch(cfg, 4, 10))
  with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
    loss = model(batch)
  with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as bwd:
    loss.backward()
  ref = irra_flops.pair_flops(cfg, cmt_depth=2, num_classes=10, mlm_positions=None, text_passes=2,
                              batch=4)
  assert torch.isfinite(loss)
  assert fwd.get_total_flops() == 4 * ref["forward"]
  assert fwd.get_total_flops() + bwd.get_total_flops() == 4 * ref["train"]
