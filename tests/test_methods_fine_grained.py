"""FMFA and the part-level method in the engine: sharding, accumulation, gate, inference, launch."""
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
from configs.methods import fmfa as fmfa_config
from configs.methods import parts as parts_config
from tipr_jax.losses import fine_grained as fg
from tipr_jax.methods import build_method
from tipr_jax.models.clip import eot_pool
from tipr_jax.models.irra import IRRA

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = step_helpers.NUM_CLASSES
CONFIGS = {"fmfa": fmfa_config, "parts": parts_config}


def _config(method, **overrides):
  """The method's synthetic smoke config (Adam eps 1e-3, lr 1e-3) with dotted-key overrides."""
  return step_helpers.smoke_config(CONFIGS[method].get_config, "synthetic,smoke", **overrides)


_clip = step_helpers.vocab_clip
_batch = step_helpers.random_batch


def _method(c, steps_per_epoch=1):
  return build_method(c, clip_config=_clip(c), num_classes=NUM_CLASSES,
                      steps_per_epoch=steps_per_epoch)


_PARAMS = {}


def _initial_params(method: str, c):
  """Initial params of `method` (host copies), cached: the init compile costs ~8 s of CPU."""
  if method not in _PARAMS:
    _PARAMS[method] = jax.device_get(jax.jit(_method(c).init)(jax.random.key(0)))
  return _PARAMS[method]


def _run(c, devices, batches):
  """Trains on `batches` with steps_per_epoch = 1 (the parts gate opens at step start_epoch)."""
  _, params, metrics = step_helpers.run_steps(c, devices, batches,
                                              params=_initial_params(c.method, c),
                                              steps_per_epoch=1)
  return params, metrics


# Parameters are O(1e-3..1) and each step moves them by up to lr = 1e-3, so a 1e-5 bound on the
# largest difference catches any wrong update while allowing float32 summation-order noise.
_max_abs_diff = step_helpers.max_abs_diff


# FMFA with EFA chunked in blocks of 3 rows (a padded last block); parts with the gate closed on
# the first step and open on the second (start_epoch 1, one step per epoch).
VARIANT = {"fmfa": {"fmfa.efa_chunk_size": 3}, "parts": {}}
_REFERENCE = {}


def _batches(method):
  clip = _clip(_config(method))
  return [_batch(clip, 8, s) for s in range(2)]


def _reference(method):
  """Two steps on one device without accumulation (cached: shared by the parity tests)."""
  if method not in _REFERENCE:
    _REFERENCE[method] = _run(_config(method, **VARIANT[method]), jax.devices()[:1],
                              _batches(method))
  return _REFERENCE[method]


@pytest.mark.parametrize("method", ["fmfa", "parts"])
def test_eight_devices_equal_one_device(method):
  p1, m1 = _reference(method)
  p8, m8 = _run(_config(method, **VARIANT[method]), jax.devices()[:8], _batches(method))
  np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=1e-5)
  assert _max_abs_diff(p8, p1) < 1e-5
  if method == "parts":
    assert [m["part_gate"] for m in m1] == [0.0, 1.0]
    assert all(m["part_loss"] > 0 and m["cmr_loss"] >= 0 for m in m1)
  else:
    assert all(m["efa_loss"] > 0 and m["asdm_loss"] > 0 for m in m1)


@pytest.mark.parametrize("method", ["fmfa", "parts"])
def test_gradient_accumulation_equals_full_batch(method):
  """4 micro-batches on 2 devices equal one full batch on one device."""
  p1, m1 = _reference(method)
  c = _config(method, **VARIANT[method], **{"train.grad_accum_steps": 4})
  p4, m4 = _run(c, jax.devices()[:2], _batches(method))
  np.testing.assert_allclose([m["loss"] for m in m4], [m["loss"] for m in m1], rtol=1e-5)
  assert _max_abs_diff(p4, p1) < 1e-5


def _random_outputs(method, batch):
  """Random per-example outputs with the shapes `method.forward` gives for `batch`."""
  shapes = jax.eval_shape(method.forward, jax.eval_shape(method.init, jax.random.key(0)), batch,
                          None)
  keys = jax.random.split(jax.random.key(7), len(shapes))
  out = {k: jax.random.normal(key, s.shape, s.dtype)
         for key, (k, s) in zip(keys, sorted(shapes.items()))}
  for k in ("mlm_count", "mlm_nll", "mlm_correct"):
    out[k] = jnp.abs(out[k]) + 1.0
  if "part_weights" in out:
    out["part_weights"] = jax.nn.softmax(out["part_weights"], axis=-1)
  return out


def test_part_losses_start_at_the_configured_epoch():
  """Before start_epoch * steps_per_epoch the part outputs (hence the decoder, which only feeds
  them) get exactly zero gradient and the global terms are unchanged; from then on, not."""
  c = _config("parts", **{"parts.start_epoch": 2})
  method = _method(c, steps_per_epoch=3)
  batch = {k: jnp.asarray(v) for k, v in _batch(_clip(c), 8).items()}
  outputs = _random_outputs(method, batch)
  fn = jax.jit(jax.value_and_grad(lambda o, s: method.loss(o, batch, s), has_aux=True))
  part_keys = ("image_parts", "text_parts", "part_weights")
  grads_by_gate = {}
  for step, gate in ((0, 0.0), (5, 0.0), (6, 1.0), (40, 1.0)):
    (loss, metrics), grads = fn(outputs, jnp.int32(step))
    assert float(metrics["part_gate"]) == gate
    part_grad = max(float(jnp.max(jnp.abs(grads[k]))) for k in part_keys)
    assert (part_grad > 0) == bool(gate), (step, part_grad)
    part = float(metrics["part_loss"] + metrics["cmr_loss"])
    rest = float(sum(metrics[k] for k in ("sdm_loss", "id_loss", "mlm_loss")))
    np.testing.assert_allclose(float(loss), rest + gate * part, rtol=1e-6)
    grads_by_gate[gate] = grads
  for k in ("image_feats", "image_logits", "mlm_nll"):
    np.testing.assert_array_equal(grads_by_gate[0.0][k], grads_by_gate[1.0][k])


def test_parts_keeps_irra_parameter_names_and_init():
  """IRRAParts = IRRA + part_decoder: same names, shapes and initial values for the IRRA part."""
  cf, cp = _config("fmfa"), _config("parts")
  assert type(_method(cf).model) is IRRA  # FMFA's model is IRRA itself
  assert (cf.model.clip, cf.model.cmt_depth) == (cp.model.clip, cp.model.cmt_depth)
  irra_params = _initial_params("fmfa", cf)
  parts_params = _initial_params("parts", cp)
  shared = {k: v for k, v in parts_params.items() if k != "part_decoder"}
  assert set(parts_params) - set(irra_params) == {"part_decoder"}
  assert jax.tree_util.tree_structure(shared) == jax.tree_util.tree_structure(irra_params)
  assert _max_abs_diff(shared, irra_params) == 0.0


def test_fmfa_without_its_losses_is_irra():
  """asdm_mode='off' (IRRA's SDM) and EFA weight 0: the IRRA method's loss and metrics on the same
  per-example outputs (that the outputs are IRRA's is test_fmfa_caption_sources)."""
  c = _config("fmfa", **{"fmfa.asdm_mode": "off", "losses.efa": 0.0})
  ci = _config("fmfa")
  ci.method = "irra"
  fm, im = _method(c), _method(ci)
  batch = {k: jnp.asarray(v) for k, v in _batch(_clip(c), 8).items()}
  out = _random_outputs(fm, batch)
  assert set(out) == set(_random_outputs(im, batch))
  lf, mf = fm.loss(out, batch, jnp.int32(0))
  li, mi = im.loss(out, batch, jnp.int32(0))
  np.testing.assert_allclose(float(lf), float(li), rtol=1e-6)
  assert set(mf) == set(mi)
  for k in mi:
    np.testing.assert_allclose(float(mf[k]), float(mi[k]), rtol=1e-6)


@pytest.mark.parametrize("masked_global,efa_caption,text_src,efa_src", [
    (True, "global", "mlm_ids", "mlm_ids"),       # FMFA code (aliased masking): one text pass
    (True, "clean", "mlm_ids", "caption_ids"),
    (False, "global", "caption_ids", "caption_ids"),
])
def test_fmfa_caption_sources(masked_global, efa_caption, text_src, efa_src):
  c = _config("fmfa", masked_caption_for_global=masked_global, **{"fmfa.efa_caption": efa_caption})
  method = _method(c)
  params = _initial_params("fmfa", c)
  batch = {k: jnp.asarray(v) for k, v in _batch(_clip(c), 4).items()}
  out = method.forward(params, batch, None)
  model = method.model

  def tokens(ids):
    return model.apply({"params": params}, ids, method=IRRA.text_tokens)

  np.testing.assert_allclose(out["efa_text"], tokens(batch[efa_src]), atol=1e-6)
  np.testing.assert_allclose(out["text_feats"], eot_pool(tokens(batch[text_src]), batch[text_src]),
                             atol=1e-6)
  img = model.apply({"params": params}, batch["images"], method=IRRA.image_tokens)
  np.testing.assert_allclose(out["efa_patches"], img[:, 1:], atol=1e-6)
  assert batch["mlm_ids"].tolist() != batch["caption_ids"].tolist()


@pytest.mark.parametrize("weights", ["predicted", "uniform"])
def test_combined_inference_ranks_by_global_plus_part_similarity(weights):
  """Evaluator-style cosine of encode_text/encode_image = combined_similarity up to row scales."""
  c = _config("parts", **{"parts.inference_weights": weights, "parts.part_scale": 0.7})
  method = _method(c)
  params = jax.tree_util.tree_map(  # perturb so the predicted weights are far from uniform
      lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape),
      _initial_params("parts", c))
  batch = _batch(_clip(c), 6)
  q = method.encode_text(params, jnp.asarray(batch["caption_ids"]))
  g = method.encode_image(params, jnp.asarray(batch["images"]))
  norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  got = np.asarray(norm(q) @ norm(g).T, np.float64)
  # Independent pieces: global features and parts from the model, combined by the loss library.
  m = method.model
  img = m.apply({"params": params}, jnp.asarray(batch["images"]), method=m.image_tokens)
  ids = jnp.asarray(batch["caption_ids"])
  txt = m.apply({"params": params}, ids, method=m.text_tokens)
  gt = eot_pool(txt, ids)
  ip = m.apply({"params": params}, img, method=m.image_parts)
  tp = m.apply({"params": params}, txt, ids, method=m.text_parts)
  k = ip.shape[1]
  w = (m.apply({"params": params}, gt, method=m.part_weights) if weights == "predicted"
       else jnp.full((6, k), 1.0 / k))
  if weights == "predicted":
    assert float(jnp.max(jnp.abs(w - 1.0 / k))) > 1e-3
  gsim = norm(gt) @ norm(img[:, 0]).T
  want = np.asarray(fg.combined_similarity(gsim, fg.part_similarity(ip, tp), w, 0.7), np.float64)
  scale = np.linalg.norm(np.asarray(q, np.float64), axis=1, keepdims=True) * np.sqrt(1 + k)
  np.testing.assert_allclose(got * scale, want, atol=2e-5)
  assert (np.argsort(-got, axis=1) == np.argsort(-want, axis=1)).all()


def test_global_inference_is_the_irra_encoder():
  c = _config("parts", **{"parts.inference": "global"})
  method = _method(c)
  params = _initial_params("parts", c)
  ids = jnp.asarray(_batch(_clip(c), 3)["caption_ids"])
  np.testing.assert_allclose(method.encode_text(params, ids),
                             method.model.apply({"params": params}, ids, method=IRRA.encode_text))


# --------------------------------------------------------------------------- configs and errors


@pytest.mark.parametrize("dataset", ["synthetic", "cuhk", "icfg", "rstp"])
def test_configs_for_every_dataset(dataset):
  f = fmfa_config.get_config(dataset)
  assert f.method == "fmfa" and f.fmfa.asdm_mode == "code"
  assert (f.fmfa.efa_margin_text, f.fmfa.efa_margin_image) == fg.EFA_CODE_MARGINS
  fp = fmfa_config.get_config(dataset + ",paper")
  assert fp.fmfa.asdm_mode == "paper" and not fp.fmfa.efa_row_normalize
  assert fp.fmfa.asdm_alpha == (1.0 if dataset == "rstp" else 10.0)
  p = parts_config.get_config(dataset)
  assert p.method == "parts" and "part_decoder" in p.optim.high_lr_keys
  if dataset != "synthetic":
    optim = (f.optim.lr, f.optim.lr_factor, f.optim.bias_lr_factor, f.optim.eps)
    assert optim == (5e-6, 1, 1, 1e-3)
    assert f.optim.weight_decay_bias == 4e-5 and f.train.batch_size == 64
    assert fp.optim.lr == 1e-5 and fp.train.num_epochs == (100 if dataset == "icfg" else 60)
    assert p.parts.start_epoch == 15 and p.train.batch_size == 128
    assert (p.optim.lr, p.optim.lr_factor) == ((5e-7, 130.0) if dataset == "rstp" else (5e-6, 20.0))
  else:  # the synthetic IRRA recipe, unchanged
    from configs import synthetic
    base = synthetic.get_config()
    assert f.optim.lr == p.optim.lr == base.optim.lr
    assert f.train.num_epochs == p.train.num_epochs == base.train.num_epochs
  smoke = parts_config.get_config(dataset + ",smoke")
  assert smoke.train.batch_size == 8 and smoke.parts.start_epoch == 1


def test_paper_margins_per_dataset():
  got = {d: (fmfa_config.get_config(d + ",paper").fmfa.efa_margin_text,
             fmfa_config.get_config(d + ",paper").fmfa.efa_margin_image)
         for d in ("cuhk", "icfg", "rstp")}
  assert got == {"cuhk": (0.1, 0.1), "icfg": (0.2, 1.0), "rstp": (0.2, 0.8)}


def test_bad_config_arguments_are_named():
  with pytest.raises(ValueError, match="must start with a dataset"):
    fmfa_config.get_config("smoke")
  with pytest.raises(ValueError, match="unknown preset 'paper'"):
    parts_config.get_config("cuhk,paper")
  c = _config("fmfa", **{"fmfa.asdm_mode": "papr"})
  with pytest.raises(ValueError, match="fmfa.asdm_mode"):
    _method(c)
  c = _config("parts", **{"parts.inference": "parts"})
  with pytest.raises(ValueError, match="parts.inference"):
    _method(c)
  with pytest.raises(ValueError, match="start_epoch"):
    _method(_config("parts"), steps_per_epoch=None)


# --------------------------------------------------------------------------- launch.py


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  return env


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
  """Both smoke configs through launch.py, run concurrently on one synthetic dataset made first."""
  from tipr_jax.training import data_setup
  root = tmp_path_factory.mktemp("fine_grained_smoke")
  data = [f"--config.data.manual_dir={root}/raw", f"--config.data.data_dir={root}/tfds"]
  c = fmfa_config.get_config("synthetic,smoke")
  c.data.manual_dir, c.data.data_dir = f"{root}/raw", f"{root}/tfds"
  data_setup.setup_data(c)  # generate + prepare once, so the two runs do not race
  procs = {}
  for method in CONFIGS:
    cmd = [sys.executable, str(ROOT / "launch.py"),
           f"--config={ROOT}/configs/methods/{method}.py:synthetic,smoke",
           f"--workdir={root}/{method}", *data]
    procs[method] = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
  results = {}
  for method, proc in procs.items():
    out, err = proc.communicate(timeout=900)
    results[method] = (proc.returncode, out, err, root / method)
  return results


@pytest.mark.parametrize("method,losses", [
    ("fmfa", ("asdm_loss", "efa_loss", "id_loss", "mlm_loss")),
    ("parts", ("sdm_loss", "part_loss", "cmr_loss"))])
def test_smoke_config_trains_and_evaluates(smoke_runs, method, losses):
  code, out, err, workdir = smoke_runs[method]
  assert code == 0, out[-2000:] + err[-4000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["config"]["method"] == method
  for key in ("R1", "R5", "R10", "mAP", "mINP"):
    assert 0.0 <= results["last"][key] <= 100.0
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["kind"] == "train"]
  for name in losses:
    assert all(np.isfinite(r[name]) for r in train), name
  if method == "parts":  # start_epoch 1 of 2: the gate is closed in epoch 1, open in epoch 2
    per_epoch = results["last"]["step"] // results["config"]["train"]["num_epochs"]
    gates = {r["step"]: r["part_gate"] for r in train}
    assert gates[1] == gates[per_epoch] == 0.0 and gates[per_epoch + 1] == 1.0
