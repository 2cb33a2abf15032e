"""UCFA and MUM as methods: sharded step = 1-device step, accumulation = full batch, fused inference
features, initialization from the towers, and smoke training through launch.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import step_helpers
from configs.methods import mum as mum_config
from configs.methods import ucfa as ucfa_config
from tipr_jax import losses
from tipr_jax.losses import probabilistic as prob
from tipr_jax.methods import build_method, mum, ucfa
from tipr_jax.models.clip import DualEncoder
from tipr_jax.models.gaussian import tower_parts

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ucfa": ucfa_config, "mum": mum_config}
NUM_CLASSES = step_helpers.NUM_CLASSES


def _config(method: str, **train):
  return step_helpers.smoke_config(CONFIGS[method].get_config, "synthetic,smoke",
                                   **{f"train.{k}": v for k, v in train.items()})


_clip = step_helpers.vocab_clip
_batch = step_helpers.random_batch
_run = step_helpers.run_steps
_max_abs_diff = step_helpers.max_abs_diff


@pytest.mark.parametrize("method", ["ucfa", "mum"])
def test_eight_devices_and_accumulation_equal_one_device(method):
  """Two steps (fresh per-example noise each step) of batch 16: 8 devices x 2 micro-batches of 8
  give the 1-device full-batch parameters within 1e-5 (lr 1e-3: a wrong update moves them by
  ~1e-3). One comparison covers sharding and exact accumulation (two compiles instead of three);
  tests/test_train_step.py checks each on its own for IRRA."""
  c = _config(method, batch_size=16)
  batches = [_batch(_clip(c), 16, s) for s in range(2)]
  p0, p1, m1 = _run(c, jax.devices()[:1], batches)
  _, p8, m8 = _run(_config(method, batch_size=16, grad_accum_steps=2), jax.devices()[:8], batches)
  expected = {"ucfa": ("dcl_loss", "pcl_loss", "uamlr_loss", "reg_loss"),
              "mum": ("sdm_loss", "id_loss", "mlm_loss", "circle_loss", "gmr_loss")}[method]
  for m in m1:
    assert m["finite"] == 1.0 and all(k in m for k in expected), m
  np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=1e-5)
  assert _max_abs_diff(p8, p1) < 1e-5
  assert _max_abs_diff(p1, p0) > 1e-4  # the steps did move the parameters


@pytest.mark.parametrize("prob_as_sum", [True, False])
def test_fused_embedding_cosine_is_the_fused_similarity(prob_as_sum):
  k, d, w = 3, 16, 0.1
  r = np.random.default_rng(0)
  mu_q, mu_g = r.standard_normal((5, d)), r.standard_normal((7, d))
  sq = mu_q + 0.3 * r.standard_normal((k, 5, d))
  sg = mu_g + 0.3 * r.standard_normal((k, 7, d))
  coef = w * k if prob_as_sum else w / 2
  q = ucfa.fused_embedding(jnp.asarray(mu_q), jnp.asarray(sq), w, coef, "query")
  g = ucfa.fused_embedding(jnp.asarray(mu_g), jnp.asarray(sg), w, coef, "gallery")
  norms_q, norms_g = np.linalg.norm(q, axis=1), np.linalg.norm(g, axis=1)
  total = 1 - w + 2 * coef
  np.testing.assert_allclose(norms_q, np.sqrt(total), rtol=1e-5)  # constant norms: the cosine
  np.testing.assert_allclose(norms_g, np.sqrt(total), rtol=1e-5)  # ranks like the dot product
  want = prob.fused_similarity(mu_q, mu_g, sq, sg, weight=w, prob_as_sum=prob_as_sum)
  cos = (q / norms_q[:, None]) @ (g / norms_g[:, None]).T
  np.testing.assert_allclose(np.asarray(cos) * total, np.asarray(want), atol=2e-5)


def test_fused_inference_encoders_and_mean_inference_equal_irra_encoders():
  c = _config("ucfa")
  clip = _clip(c)
  b = _batch(clip, 4, 0)
  mean = build_method(c, clip_config=clip, num_classes=NUM_CLASSES)
  params = mean.init(jax.random.key(0))
  base = DualEncoder(clip)
  mi = np.asarray(jax.jit(mean.encode_image)(params, b["images"]))
  np.testing.assert_allclose(mi, jax.jit(lambda p, x: base.apply(
      {"params": p}, x, method=DualEncoder.encode_image))(params["base_model"], b["images"]),
                             atol=1e-6)
  c.ucfa.inference = "fused"
  fused = build_method(c, clip_config=clip, num_classes=NUM_CLASSES)
  enc_i, enc_t = jax.jit(fused.encode_image), jax.jit(fused.encode_text)
  fi, ft = enc_i(params, b["images"]), enc_t(params, b["caption_ids"])
  d = clip.embed_dim
  assert fi.shape == ft.shape == (4, 3 * d + 2)
  # First block: sqrt(1 - w) * normalized mean feature.
  np.testing.assert_allclose(fi[:, :d], np.sqrt(0.9) * mi / np.linalg.norm(mi, axis=1,
                                                                           keepdims=True), atol=1e-5)
  np.testing.assert_array_equal(enc_t(params, b["caption_ids"]), ft)  # deterministic


@pytest.mark.parametrize("head", ["block", "mlp"])
def test_ucfa_heads_init_and_log_sigma_start(head):
  """Block head: its body is a copy of each tower's last block; both heads start just above the
  entropy margin's floor (the regularizer is exactly 0 at init, log_sigma constant)."""
  c = _config("ucfa")
  c.ucfa.head = head
  clip = _clip(c)
  method = build_method(c, clip_config=clip, num_classes=NUM_CLASSES)
  params = jax.jit(method.init)(jax.random.key(0))
  if head == "block":
    for name, tower in (("image_logsigma", "visual"), ("text_logsigma", "text")):
      last, _, _ = tower_parts(params["base_model"][tower])
      body = {k: v for k, v in params[name].items() if k != "out"}
      jax.tree_util.tree_map(np.testing.assert_array_equal, body, dict(last))
      # Modifying the tower afterwards and re-tying copies again (after_pretrained).
    moved = jax.tree_util.tree_map(lambda x: x + 1.0, params["base_model"])
    retied = method.after_pretrained(dict(params, base_model=moved))
    last, _, _ = tower_parts(moved["visual"])
    np.testing.assert_array_equal(retied["image_logsigma"]["ln_1"]["scale"], last["ln_1"]["scale"])
  b = _batch(clip, 4, 0)
  b["example_index"] = np.arange(4, dtype=np.int32)
  out = jax.jit(method.forward)(params, b, jax.random.key(2))
  floor = ucfa.entropy_floor_log_sigma(300.0 * clip.embed_dim / 512, clip.embed_dim)
  np.testing.assert_allclose(out["image_log_sigma"], floor + ucfa.FLOOR_OFFSET, atol=1e-6)
  np.testing.assert_allclose(out["text_log_sigma"], floor + ucfa.FLOOR_OFFSET, atol=1e-6)
  np.testing.assert_array_equal(out["reg_image"], 0.0)
  np.testing.assert_array_equal(out["reg_text"], 0.0)
  assert out["image_samples"].shape == (4, 3, clip.embed_dim)


def test_ucfa_losses_reduce_to_deterministic_counterparts_as_sigma_vanishes():
  """log_sigma -> -30: DCL = SDM on the means, PCL inter = SDM on the means (K copies)."""
  c = _config("ucfa")
  c.ucfa.log_sigma_init = -30.0
  c.losses.pcl = 0.0
  clip = _clip(c)
  method = build_method(c, clip_config=clip, num_classes=NUM_CLASSES)
  params = method.init(jax.random.key(0))
  b = _batch(clip, 8, 1)
  b["example_index"] = np.arange(8, dtype=np.int32)
  out = jax.jit(method.forward)(params, b, jax.random.key(2))
  _, metrics = jax.jit(method.loss)(out, b, 0)
  want = losses.sdm(out["image_mu"], out["text_mu"], b["pids"], logit_scale=1.0 / c.model.temperature)
  np.testing.assert_allclose(metrics["dcl_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(out["image_samples"], np.repeat(out["image_mu"][:, None], 3, 1),
                             atol=1e-6)


def test_mum_augmentation_is_the_pure_uncertainty_augment():
  r = np.random.default_rng(0)
  f = jnp.asarray(r.standard_normal((6, 8)), jnp.float32)
  pids = jnp.asarray([0, 0, 1, 2, 2, 2])
  key = jax.random.key(3)
  eps = jax.random.normal(key, (2, 6, 8))  # what uncertainty_augment draws: [S,B,D]
  got = mum.augment(f, jnp.swapaxes(eps, 0, 1), pids, 0.5, 2.0)
  want = prob.uncertainty_augment(f, pids, key, lambda_batch=0.5, lambda_id=2.0, num_samples=2)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # d f~ / d f = identity (variances are stop-gradient).
  g = jax.grad(lambda x: jnp.sum(mum.augment(x, jnp.swapaxes(eps, 0, 1), pids, 1.0, 1.0)))(f)
  np.testing.assert_allclose(g, 2.0 * np.ones_like(f))


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="dataset"):
    ucfa_config.get_config("nowhere")
  with pytest.raises(ValueError, match="unknown preset 'fast'"):
    mum_config.get_config("synthetic,fast")
  c = _config("ucfa")
  c.losses.mlm = 1.0
  with pytest.raises(ValueError, match="config.losses.mlm"):
    build_method(c, clip_config=_clip(c), num_classes=NUM_CLASSES)
  c = _config("ucfa")
  c.ucfa.similarity = "kl"
  with pytest.raises(ValueError, match="config.ucfa.similarity"):
    build_method(c, clip_config=_clip(c), num_classes=NUM_CLASSES)
  c = _config("mum")
  c.losses.mlm = 0.0
  with pytest.raises(ValueError, match="config.losses.gmr"):
    build_method(c, clip_config=_clip(c), num_classes=NUM_CLASSES)


# ----------------------------------------------------------------------------------------------
# launch.py end to end (subprocess), one generated dataset shared by the runs


def _launch(workdir, data_root, config, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT / config}",
         f"--workdir={workdir}", f"--config.data.manual_dir={data_root}/raw",
         f"--config.data.data_dir={data_root}/tfds", "--config.train.max_steps=4", *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return tmp_path_factory.mktemp("prob_smoke_data")


@pytest.mark.parametrize("method", ["ucfa", "mum"])
def test_smoke_config_trains_and_evaluates_through_launch(method, data_root, tmp_path):
  """UCFA evaluates with the fused inference (its mean inference is IRRA's encoder path)."""
  workdir = tmp_path / method
  extra = ["--config.ucfa.inference=fused"] if method == "ucfa" else []
  proc = _launch(workdir, data_root, f"configs/methods/{method}.py:synthetic,smoke", *extra)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"]["method"] == method
  for key in ("R1", "R5", "R10", "mAP", "mINP"):
    assert 0.0 <= results["last"][key] <= 100.0
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  loss_key = {"ucfa": "uamlr_loss", "mum": "circle_loss"}[method]
  assert any(r["kind"] == "train" and loss_key in r for r in rows)
