"""IRRA losses against an independent float64 PyTorch re-derivation of spec/irra-reference.md §3."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from tipr_jax import losses

# --- Reference formulas, written from the spec in torch (float64 features, float32 labels) -----------


def ref_sdm(i, t, pid, logit_scale=50.0, eps=1e-8, log_q_dtype=torch.float32, summed=True):
  b = i.shape[0]
  pid = pid.reshape(b, 1)
  labels = ((pid - pid.t()) == 0).float()  # float32 always
  i_n = i / i.norm(dim=1, keepdim=True)
  t_n = t / t.norm(dim=1, keepdim=True)
  t2i_cos = t_n @ i_n.t()
  i2t_cos = t2i_cos.t()
  text_proj_image = logit_scale * t2i_cos
  image_proj_text = logit_scale * i2t_cos
  q = labels / labels.sum(dim=1)  # broadcasts over the last dim, as in the reference
  log_q = torch.log(q.to(log_q_dtype) + eps)
  i2t_pred = F.softmax(image_proj_text, dim=1)
  i2t_loss = i2t_pred * (F.log_softmax(image_proj_text, dim=1) - log_q)
  t2i_pred = F.softmax(text_proj_image, dim=1)
  t2i_loss = t2i_pred * (F.log_softmax(text_proj_image, dim=1) - log_q)
  total = torch.mean(torch.sum(i2t_loss, dim=1)) + torch.mean(torch.sum(t2i_loss, dim=1))
  return total if summed else total / 2


def ref_itc(i, t, logit_scale):
  i_n = i / i.norm(dim=-1, keepdim=True)
  t_n = t / t.norm(dim=-1, keepdim=True)
  logits = logit_scale * i_n @ t_n.t()
  target = torch.arange(i.shape[0])
  return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def ref_cmpm(i, t, pid, eps=1e-8):
  b = i.shape[0]
  pid = pid.reshape(b, 1)
  mask = ((pid - pid.t()) == 0).float()
  i_n = i / i.norm(dim=1, keepdim=True)
  t_n = t / t.norm(dim=1, keepdim=True)
  image_proj_text = i @ t_n.t()
  text_proj_image = t @ i_n.t()
  q = mask / mask.norm(dim=1)
  log_q = torch.log(q + eps)
  i2t = F.softmax(image_proj_text, dim=1) * (F.log_softmax(image_proj_text, dim=1) - log_q)
  t2i = F.softmax(text_proj_image, dim=1) * (F.log_softmax(text_proj_image, dim=1) - log_q)
  return torch.mean(torch.sum(i2t, dim=1)) + torch.mean(torch.sum(t2i, dim=1))


def ref_id(image_logits, text_logits, pids):
  return (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2


def ref_mlm(scores, labels):
  v = scores.shape[-1]
  return torch.nn.CrossEntropyLoss(ignore_index=0)(scores.reshape(-1, v), labels.reshape(-1))


def ref_mlm_acc(scores, labels):
  v = scores.shape[-1]
  pred = scores.reshape(-1, v).max(1)[1]
  labels = labels.reshape(-1)
  idx = torch.nonzero(labels)
  return (pred[idx] == labels[idx]).float().mean()


# --- helpers -------------------------------------------------------------------------------------------


def _feats(seed, b=8, d=6):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((b, d)), rng.standard_normal((b, d))


# Several identities with 1, 2 and 3 pairs in one batch (several same-pid pairs).
PIDS = np.array([3, 7, 3, 1, 7, 3, 9, 2])


def _jit_vg(fn, **kw):
  """jit(value_and_grad): one compilation instead of op-by-op dispatch (keeps the tests fast)."""
  return jax.jit(jax.value_and_grad(fn, **kw))


def _torch_value_and_grads(fn, *arrays):
  ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
  out = fn(*ts)
  out.backward()
  return out.item(), [t.grad.numpy() for t in ts]


# --- SDM ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_sdm_value_and_grad_match_reference(seed):
  i, t = _feats(seed)
  ref, (gi_ref, gt_ref) = _torch_value_and_grads(
      lambda a, b: ref_sdm(a, b, torch.tensor(PIDS)), i, t)
  with jax.enable_x64(True):
    fn = lambda a, b: losses.sdm(a, b, jnp.asarray(PIDS))
    val, (gi, gt) = _jit_vg(fn, argnums=(0, 1))(jnp.asarray(i), jnp.asarray(t))
    assert val.dtype == jnp.float64
    np.testing.assert_allclose(float(val), ref, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gi), gi_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gt), gt_ref, rtol=1e-9, atol=1e-12)


def test_sdm_quirks_are_distinguishable():
  """The test above can tell the quirks apart: float64 log(q) or averaged directions give other values."""
  i, t = _feats(3)
  pid = torch.tensor(PIDS)
  ti, tt = torch.tensor(i), torch.tensor(t)
  with jax.enable_x64(True):
    ours = float(losses.sdm(jnp.asarray(i), jnp.asarray(t), jnp.asarray(PIDS)))
  quirky = ref_sdm(ti, tt, pid).item()
  log_q_f64 = ref_sdm(ti, tt, pid, log_q_dtype=torch.float64).item()
  averaged = ref_sdm(ti, tt, pid, summed=False).item()
  assert abs(ours - quirky) < 1e-12 * abs(quirky)
  assert abs(ours - log_q_f64) > 1e-9  # log(1/3 + 1e-8) in float32 vs float64
  assert abs(ours - averaged) > 1.0


def test_sdm_target_broadcasting_equals_row_normalisation():
  labels = (PIDS[:, None] == PIDS[None, :]).astype(np.float32)
  quirky = labels / labels.sum(axis=1)  # numpy broadcasts like torch: column b / count(pid_b)
  rows = labels / labels.sum(axis=1, keepdims=True)
  np.testing.assert_array_equal(quirky, rows)
  np.testing.assert_array_equal(quirky, quirky.T)


def test_sdm_logit_scale_and_float32_inputs():
  i, t = _feats(4)
  ref = ref_sdm(torch.tensor(i), torch.tensor(t), torch.tensor(PIDS), logit_scale=20.0).item()
  val = losses.sdm(jnp.asarray(i, jnp.float32), jnp.asarray(t, jnp.float32), PIDS, logit_scale=20.0)
  assert val.dtype == jnp.float32
  np.testing.assert_allclose(float(val), ref, rtol=2e-5)


def test_sdm_all_distinct_pids_includes_negatives():
  """With distinct pids and identical features every softmax is uniform: closed form check."""
  b = 4
  x = np.ones((b, 3))
  pids = np.arange(b)
  # p = 1/b everywhere; diagonal term 1/b*(log(1/b) - log(1 + 1e-8)); off-diagonal (b-1)/b*(log(1/b) -
  # log(1e-8)). Summed over the row, averaged over rows, and doubled for the two directions.
  row = (1 / b) * (np.log(1 / b) - np.log(np.float32(1.0) + np.float32(1e-8)))
  row += (b - 1) / b * (np.log(1 / b) - np.log(np.float32(1e-8)))
  with jax.enable_x64(True):
    val = float(losses.sdm(jnp.asarray(x), jnp.asarray(x), jnp.asarray(pids)))
  np.testing.assert_allclose(val, 2 * row, rtol=1e-12)


def test_sdm_zero_feature_gives_nan_like_reference():
  i, t = _feats(5)
  i[2] = 0.0
  ref = ref_sdm(torch.tensor(i), torch.tensor(t), torch.tensor(PIDS)).item()
  with jax.enable_x64(True):
    val = float(losses.sdm(jnp.asarray(i), jnp.asarray(t), jnp.asarray(PIDS)))
  assert np.isnan(ref) and np.isnan(val)


def test_sdm_finite_differences():
  i, t = _feats(6, b=4, d=3)
  pids = np.array([0, 1, 0, 2])
  with jax.enable_x64(True):
    f = jax.jit(lambda a: losses.sdm(a, jnp.asarray(t), jnp.asarray(pids)))
    g = np.asarray(jax.grad(f)(jnp.asarray(i)))
    h = 1e-6
    fd = np.zeros_like(i)
    for idx in np.ndindex(*i.shape):
      e = np.zeros_like(i)
      e[idx] = h
      fd[idx] = (float(f(jnp.asarray(i + e))) - float(f(jnp.asarray(i - e)))) / (2 * h)
  np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)


# --- ITC / CMPM / ID ---------------------------------------------------------------------------------


def test_itc_value_and_grad_match_reference():
  i, t = _feats(7)
  ref, (gi_ref, gt_ref) = _torch_value_and_grads(lambda a, b: ref_itc(a, b, 50.0), i, t)
  with jax.enable_x64(True):
    val, (gi, gt) = _jit_vg(lambda a, b: losses.itc(a, b, 50.0), argnums=(0, 1))(
        jnp.asarray(i), jnp.asarray(t))
    np.testing.assert_allclose(float(val), ref, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gi), gi_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gt), gt_ref, rtol=1e-9, atol=1e-12)


def test_cmpm_value_and_grad_match_reference():
  i, t = _feats(8)
  ref, (gi_ref, gt_ref) = _torch_value_and_grads(
      lambda a, b: ref_cmpm(a, b, torch.tensor(PIDS)), i, t)
  with jax.enable_x64(True):
    val, (gi, gt) = _jit_vg(
        lambda a, b: losses.cmpm(a, b, jnp.asarray(PIDS)), argnums=(0, 1))(jnp.asarray(i), jnp.asarray(t))
    np.testing.assert_allclose(float(val), ref, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gi), gi_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gt), gt_ref, rtol=1e-9, atol=1e-12)
  # The un-normalized projection matters: scaling the image features changes the loss.
  with jax.enable_x64(True):
    scaled = float(losses.cmpm(jnp.asarray(3 * i), jnp.asarray(t), jnp.asarray(PIDS)))
  assert abs(scaled - ref) > 1e-3


def test_id_loss_value_and_grad_match_reference():
  rng = np.random.default_rng(9)
  il, tl = rng.standard_normal((8, 11)), rng.standard_normal((8, 11))
  pids = np.array([0, 3, 10, 3, 5, 0, 7, 1])
  ref, (gi_ref, gt_ref) = _torch_value_and_grads(lambda a, b: ref_id(a, b, torch.tensor(pids)), il, tl)
  with jax.enable_x64(True):
    val, (gi, gt) = _jit_vg(
        lambda a, b: losses.id_loss(a, b, jnp.asarray(pids)), argnums=(0, 1))(jnp.asarray(il), jnp.asarray(tl))
    np.testing.assert_allclose(float(val), ref, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gi), gi_ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.asarray(gt), gt_ref, rtol=1e-10, atol=1e-14)


# --- MLM --------------------------------------------------------------------------------------------------


def _mlm_case(seed, shape=(3, 7), v=13, rate=0.4):
  rng = np.random.default_rng(seed)
  scores = rng.standard_normal(shape + (v,))
  labels = rng.integers(1, v, shape)
  labels[rng.random(shape) > rate] = 0
  return scores, labels


@pytest.mark.parametrize("flat", [False, True])
def test_mlm_loss_value_and_grad_match_reference(flat):
  scores, labels = _mlm_case(10)
  if flat:
    scores, labels = scores.reshape(-1, scores.shape[-1]), labels.reshape(-1)
  assert (labels == 0).any() and (labels != 0).sum() >= 3
  ref, (g_ref,) = _torch_value_and_grads(lambda s: ref_mlm(s, torch.tensor(labels)), scores)
  with jax.enable_x64(True):
    val, g = _jit_vg(lambda s: losses.mlm_loss(s, jnp.asarray(labels)))(jnp.asarray(scores))
    np.testing.assert_allclose(float(val), ref, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-10, atol=1e-14)
  # Ignored positions get no gradient, and changing their scores leaves the loss unchanged.
  assert np.all(np.asarray(g)[labels == 0] == 0)


def test_mlm_loss_is_token_level_mean():
  """Sample 0 has 1 labelled token, sample 1 has 3: a per-sample mean would weight them 1:1."""
  scores = np.zeros((2, 4, 5))
  scores[0, 0, 2] = 3.0  # confident and right
  labels = np.array([[2, 0, 0, 0], [1, 2, 3, 0]])
  with jax.enable_x64(True):
    val = float(losses.mlm_loss(jnp.asarray(scores), jnp.asarray(labels)))
  nll_right = -np.log(np.exp(3.0) / (np.exp(3.0) + 4))
  nll_uniform = np.log(5.0)
  np.testing.assert_allclose(val, (nll_right + 3 * nll_uniform) / 4, rtol=1e-12)


def test_mlm_loss_no_labels_is_zero_with_finite_grad():
  scores = np.random.default_rng(11).standard_normal((2, 3, 4)).astype(np.float32)
  labels = np.zeros((2, 3), np.int32)
  val, g = _jit_vg(lambda s: losses.mlm_loss(s, labels))(jnp.asarray(scores))
  assert float(val) == 0.0
  assert np.all(np.asarray(g) == 0)


def test_mlm_loss_shape_mismatch_raises():
  with pytest.raises(ValueError, match="labels shape"):
    losses.mlm_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))


def test_mlm_accuracy_matches_reference():
  scores, labels = _mlm_case(12, shape=(4, 9), v=5, rate=0.5)
  # Force some correct predictions so the accuracy is neither 0 nor 1.
  flat_s, flat_l = scores.reshape(-1, 5), labels.reshape(-1)
  flat_s[np.flatnonzero(flat_l)[:3], flat_l[np.flatnonzero(flat_l)[:3]]] = 10.0
  ref = ref_mlm_acc(torch.tensor(scores), torch.tensor(labels)).item()
  acc = float(losses.mlm_accuracy(jnp.asarray(scores), jnp.asarray(labels)))
  assert 0.0 < ref < 1.0
  np.testing.assert_allclose(acc, ref, rtol=1e-6)
  assert float(losses.mlm_accuracy(jnp.asarray(scores), jnp.zeros_like(jnp.asarray(labels)))) == 0.0


# --- gather_masked_positions -----------------------------------------------------------------------


def test_gather_masked_positions_gives_same_loss_as_full_projection():
  scores, labels = _mlm_case(13, shape=(4, 10), v=17, rate=0.3)
  count = int((labels != 0).sum())
  cap = count + 5

  @jax.jit
  def both(scores, labels):
    idx, valid, overflow = losses.gather_masked_positions(labels, cap)
    flat_scores = scores.reshape(-1, 17)[idx]
    gathered_labels = jnp.where(valid, labels.reshape(-1)[idx], 0)
    return idx, valid, overflow, losses.mlm_loss(flat_scores, gathered_labels), losses.mlm_loss(scores, labels)

  idx, valid, overflow, gathered, full = both(jnp.asarray(scores, jnp.float32), jnp.asarray(labels))
  assert idx.shape == (cap,) and not bool(overflow)
  np.testing.assert_array_equal(np.asarray(idx)[:count], np.flatnonzero(labels.reshape(-1)))
  np.testing.assert_array_equal(np.asarray(valid), np.arange(cap) < count)
  np.testing.assert_allclose(float(gathered), float(full), rtol=1e-6)


def test_gather_masked_positions_overflow_and_jit():
  labels = np.zeros((2, 6), np.int32)
  labels[0, [1, 4]] = 5
  labels[1, [0, 2, 5]] = 9
  f = jax.jit(losses.gather_masked_positions, static_argnums=1)
  idx, valid, overflow = f(jnp.asarray(labels), 3)
  assert bool(overflow)
  np.testing.assert_array_equal(np.asarray(idx), [1, 4, 6])
  assert np.asarray(valid).all()
  idx, valid, overflow = f(jnp.asarray(labels), 5)
  assert not bool(overflow)
  np.testing.assert_array_equal(np.asarray(idx), [1, 4, 6, 8, 11])
  with pytest.raises(ValueError, match="cap"):
    losses.gather_masked_positions(jnp.asarray(labels), 0)


# --- Explicit-axes mesh ------------------------------------------------------------------------------


def test_losses_run_batch_sharded_under_explicit_mesh():
  n_dev = len(jax.devices())
  b = 2 * n_dev
  rng = np.random.default_rng(14)
  i = rng.standard_normal((b, 6)).astype(np.float32)
  t = rng.standard_normal((b, 6)).astype(np.float32)
  pids = (np.arange(b) % 5).astype(np.int32)
  il, tl = rng.standard_normal((b, 7)).astype(np.float32), rng.standard_normal((b, 7)).astype(np.float32)
  scores, labels = _mlm_case(15, shape=(b, 5), v=9)
  scores = scores.astype(np.float32)
  labels = labels.astype(np.int32)

  def all_losses(i, t, pids, il, tl, scores, labels):
    idx, valid, overflow = losses.gather_masked_positions(labels, 4 * b)
    return jnp.stack([
        losses.sdm(i, t, pids), losses.itc(i, t, 50.0), losses.cmpm(i, t, pids),
        losses.id_loss(il, tl, pids), losses.mlm_loss(scores, labels),
        losses.mlm_accuracy(scores, labels), jnp.sum(idx * valid), overflow.astype(jnp.float32)])

  args = (i, t, pids, il, tl, scores, labels)
  expected = np.asarray(jax.jit(all_losses)(*args))
  mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    sharded = [jax.device_put(a, P("data")) for a in args]
    assert "data" in str(jax.typeof(sharded[0]))
    got = np.asarray(jax.jit(all_losses)(*sharded))
  np.testing.assert_allclose(got, expected, rtol=2e-6)
