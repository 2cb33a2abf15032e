"""Analytic FLOP counts against hand-computed values and XLA's cost analysis."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from tipr_jax.models import CLIPConfig, DualEncoder
from tipr_jax.models.flops import text_flops, transformer_flops, vision_flops


def xla_flops(config: CLIPConfig, batch: int) -> tuple[float, float]:
  """XLA's forward FLOPs of the image and text towers (lowered and compiled, not run)."""
  model = DualEncoder(config)
  h, w = config.image_size
  images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((batch, config.context_length), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), images, ids)["params"]

  def cost(method, x):
    f = jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))
    return f.lower(params, x).compile().cost_analysis()["flops"]

  return cost("image_tokens", images), cost("text_tokens", ids)


def test_hand_computed_counts():
  # One layer, d=2, N=3: 24*3*4 + 4*9*2 = 360.
  assert transformer_flops(3, 2, 1) == 360
  assert transformer_flops(3, 2, 2, kv_tokens=5) == 2 * (24 * 3 * 4 + 4 * 3 * 5 * 2)
  c = CLIPConfig.vit_b16()
  n, d = 193, 768
  expect = 2 * 192 * 768 * 768 + 12 * (24 * n * d * d + 4 * n * n * d) + 2 * n * d * 512
  assert vision_flops(c) == expect
  assert vision_flops(c, batch=8) == 8 * expect
  assert abs(vision_flops(c) / 1e9 - 34.5) < 0.1  # jax-stack.md: 34.4-34.5 GFLOP
  assert abs(text_flops(c) / 1e9 - 6.0) < 0.05
  assert text_flops(c, length=10) == 12 * (24 * 10 * 512 ** 2 + 4 * 100 * 512) + 2 * 10 * 512 * 512


@pytest.mark.parametrize("config", [
    # Small but wide enough that the uncounted elementwise work stays under 2%.
    CLIPConfig.tiny(vision_width=256, text_width=256, embed_dim=64, vision_layers=1,
                    text_layers=1),
    CLIPConfig.tiny(vision_width=192, text_width=192, embed_dim=64, vision_heads=2,
                    text_heads=2, context_length=32, stride_size=4),
], ids=["tiny-wide", "tiny-overlap-long-text"])
def test_small_configs_match_xla(config):
  xv, xt = xla_flops(config, batch=2)
  for name, ours, xla in (("vision", vision_flops(config, 2), xv),
                          ("text", text_flops(config, 2), xt)):
    assert ours <= xla, (name, ours, xla)  # XLA also counts the elementwise ops
    assert xla / ours - 1 < 0.02, (name, ours, xla)


def test_full_size_vit_b16_matches_xla():
  config = CLIPConfig.vit_b16()
  xv, xt = xla_flops(config, batch=2)
  assert 0 <= xv / vision_flops(config, 2) - 1 < 0.01, (xv, vision_flops(config, 2))
  assert 0 <= xt / text_flops(config, 2) - 1 < 0.01, (xt, text_flops(config, 2))
