"""The optimizer reproduces the reference's parameter groups, schedule and Adam update (§7)."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch

from configs import base
from tipr_jax.training import optimizer


def _optim_config(**overrides):
  c = base.irra_config().optim
  c.unlock()
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


@pytest.mark.parametrize("name,lr_mult,wd", [
    ("base_model/visual/transformer/resblocks_0/attn/in_proj_kernel", 1.0, 4e-5),
    ("base_model/visual/ln_pre/scale", 1.0, 4e-5),
    ("base_model/visual/ln_pre/bias", 2.0, 0.0),
    ("base_model/text/token_embedding/embedding", 1.0, 4e-5),
    ("cross_attn/in_proj_kernel", 5.0, 4e-5),
    ("cross_attn/in_proj_bias", 2.0, 0.0),            # rule 3 overrides rule 2
    ("cross_modal_transformer/resblocks_0/ln_1/scale", 5.0, 4e-5),
    ("cross_modal_transformer/resblocks_0/mlp/c_fc/bias", 2.0, 0.0),
    ("classifier/kernel", 5.0, 4e-5),
    ("classifier/bias", 5.0, 0.0),                     # rule 4 overrides rule 3's lr, not its wd
    ("mlm_head/fc/kernel", 5.0, 4e-5),
    ("mlm_head/dense/bias", 5.0, 0.0),
    ("ln_pre_t/scale", 1.0, 4e-5),                     # IRRA-level LNs are not "cross"
    ("ln_post/bias", 2.0, 0.0),
])
def test_group_rules_follow_reference_override_order(name, lr_mult, wd):
  c = _optim_config()
  g = optimizer.group_for_name(name, lr_factor=c.lr_factor, bias_lr_factor=c.bias_lr_factor,
                               weight_decay=c.weight_decay,
                               weight_decay_bias=c.weight_decay_bias,
                               high_lr_keys=c.high_lr_keys, head_keys=c.head_keys)
  assert (g.lr_mult, g.weight_decay) == (lr_mult, wd)


def test_per_epoch_schedule_matches_reference_values():
  c = _optim_config()
  sched = optimizer.make_schedule(c, steps_per_epoch=10, num_epochs=60)
  lrs = [float(sched(10 * (e - 1) + s)) for e in range(1, 61) for s in (0, 9)]
  per_epoch = lrs[::2]
  assert lrs[1::2] == per_epoch  # constant within an epoch
  expected_start = [1.0e-6, 2.8e-6, 4.6e-6, 6.4e-6, 8.2e-6, 1.0e-5, 9.9918e-6]
  np.testing.assert_allclose(per_epoch[:7], expected_start, rtol=1e-4)
  np.testing.assert_allclose(per_epoch[-1], 8.1545e-9, rtol=1e-3)
  # independent formula for every epoch
  for e, lr in enumerate(per_epoch, start=1):
    f = 0.1 * (1 - (e - 1) / 5) + (e - 1) / 5 if e <= 5 else 0.5 * (1 + np.cos(np.pi * (e - 6) / 55))
    np.testing.assert_allclose(lr, 1e-5 * f, rtol=1e-5)


def test_per_step_schedule_interpolates():
  c = _optim_config(schedule_unit="step")
  sched = optimizer.make_schedule(c, steps_per_epoch=10, num_epochs=60)
  assert float(sched(0)) == pytest.approx(1e-6)
  assert float(sched(5)) == pytest.approx(1e-5 * (0.1 * 0.9 + 0.1), rel=1e-5)


def test_per_step_schedule_is_continuous_and_reaches_the_peak():
  c = _optim_config(schedule_unit="step", warmup_epochs=1)
  sched = optimizer.make_schedule(c, steps_per_epoch=10, num_epochs=3)
  lrs = np.array([float(sched(s)) for s in range(30)])
  assert lrs.argmax() == 10 and lrs.max() == pytest.approx(1e-5)
  assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) < 0)
  assert np.max(np.abs(np.diff(lrs))) < 2e-6


def test_bad_schedule_unit_names_the_key():
  with pytest.raises(ValueError, match="schedule_unit"):
    optimizer.make_schedule(_optim_config(schedule_unit="epochs"), steps_per_epoch=1, num_epochs=2)


def test_adam_update_matches_torch_adam_with_coupled_l2():
  """Three steps on a weight (lr 1e-5, wd 4e-5) and a bias (lr 2e-5, wd 0) equal torch.optim.Adam."""
  rng = np.random.default_rng(0)
  w0 = rng.standard_normal((4, 3)).astype(np.float32)
  b0 = rng.standard_normal((3,)).astype(np.float32)
  grads = [(rng.standard_normal((4, 3)).astype(np.float32),
            rng.standard_normal((3,)).astype(np.float32)) for _ in range(3)]
  c = _optim_config(warmup_epochs=0)
  params = {"layer": {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}}
  tx, _ = optimizer.make_optimizer(params, c, steps_per_epoch=100, num_epochs=60)
  state = tx.init(params)
  for gw, gb in grads:
    updates, state = tx.update({"layer": {"kernel": jnp.asarray(gw), "bias": jnp.asarray(gb)}},
                               state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)

  tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
  opt = torch.optim.Adam([{"params": [tw], "lr": 1e-5, "weight_decay": 4e-5},
                          {"params": [tb], "lr": 2e-5, "weight_decay": 0.0}],
                         betas=(0.9, 0.999), eps=1e-3)
  for gw, gb in grads:
    tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
    opt.step()
  np.testing.assert_allclose(params["layer"]["kernel"], tw.detach().numpy(), rtol=0, atol=1e-7)
  np.testing.assert_allclose(params["layer"]["bias"], tb.detach().numpy(), rtol=0, atol=1e-7)
  assert not np.allclose(params["layer"]["kernel"], w0)  # it did move
