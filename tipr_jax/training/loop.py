"""train_and_evaluate: the whole training job, as small steps.

  setup data -> build method -> init (or load) params -> optimizer -> restore latest checkpoint
  -> train epochs (jitted sharded step, async metrics, checkpoints, per-epoch evaluation)
  -> final test evaluation of the last and the best model -> results.json + curves
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from tipr_jax.data import pipeline
from tipr_jax.eval import evaluate as evaluate_lib
from tipr_jax.eval import retrieval_metrics_from_features
from tipr_jax.methods import Method, build_method
from tipr_jax.models.clip import CLIPConfig
from tipr_jax.training import (batch_log, checkpointing, data_setup, optimizer, paths,
                               reporting, sharding, throughput)
from tipr_jax.training.reporting import log
from tipr_jax.training.train_step import (create_train_state, jit_train_step,
                                          make_train_step)

PyTree = Any


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def clip_config_from(config, tokenizer) -> CLIPConfig:
  """The CLIPConfig of `config.model.clip`; vocab_size 0 takes the tokenizer's size."""
  d = dict(config.model.clip)
  d["image_size"] = tuple(d["image_size"])
  if d["vocab_size"] == 0:
    d["vocab_size"] = tokenizer.vocab_size
  elif d["vocab_size"] != tokenizer.vocab_size:
    raise ValueError(f"config.model.clip.vocab_size={d['vocab_size']} but the tokenizer has "
                     f"{tokenizer.vocab_size} tokens; set it to 0 to follow the tokenizer")
  if d["context_length"] != tokenizer.context_length:
    raise ValueError(f"config.model.clip.context_length={d['context_length']} differs from the "
                     f"tokenizer's {tokenizer.context_length}")
  return CLIPConfig.from_dict(d)


def init_params(method: Method, config, mesh) -> PyTree:
  """Shape-first init, replicated over the mesh; CLIP weights from `config.pretrained` if set."""
  rng = jax.random.key(config.seed)
  params = jax.jit(method.init, out_shardings=sharding.replicated(mesh))(rng)
  if config.pretrained:
    from tipr_jax.models.pretrained import from_pretrained
    clip_cfg = method.model.clip
    _, clip_params = from_pretrained(config.pretrained, image_size=clip_cfg.image_size,
                                     config=clip_cfg, dtype=clip_cfg.dtype,
                                     pos_embed_interpolation=config.pos_embed_interpolation)
    params = _graft(params, method.clip_params_path, clip_params)
    if method.after_pretrained is not None:
      params = method.after_pretrained(params)
    others = [k for k in params if k != method.clip_params_path[0]]
    log(f"loaded CLIP weights from {config.pretrained}; newly initialized: {', '.join(others)}")
    params = jax.device_put(params, sharding.replicated(mesh))
  return params


def _graft(params: dict, path: tuple[str, ...], sub: dict) -> dict:
  """Replaces params[path] with `sub`, checking that every leaf fits."""
  target = params
  for k in path:
    target = target[k]
  want = jax.tree_util.tree_map(lambda x: x.shape, target)
  got = jax.tree_util.tree_map(lambda x: x.shape, sub)
  if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or want != got:
    raise ValueError(f"pretrained CLIP parameters do not fit the model at {'/'.join(path)}")
  out = dict(params)
  node = out
  for k in path[:-1]:
    node[k] = dict(node[k])
    node = node[k]
  node[path[-1]] = sub
  return out


@dataclasses.dataclass
class Evaluator:
  """Encodes a split's gallery and queries and computes the t2i metrics."""
  method: Method
  data: Any          # pipeline.EvalData
  mesh: Any
  split: str

  def __post_init__(self):
    self._enc_img = evaluate_lib.make_image_encoder(self.method.encode_image, self.mesh)
    self._enc_txt = evaluate_lib.make_encoder(self.method.encode_text, self.mesh)

  def __call__(self, params) -> dict[str, float]:
    g, g_sec = evaluate_lib.encode_all(self._enc_img, params, self.data.gallery_batches(),
                                       "images", self.mesh)
    q, q_sec = evaluate_lib.encode_all(self._enc_txt, params, self.data.query_batches(),
                                       "caption_ids", self.mesh)
    metrics = retrieval_metrics_from_features(q, g, self.data.query_pids, self.data.gallery_pids)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics.update(images_per_s=len(g) / max(g_sec, 1e-9), captions_per_s=len(q) / max(q_sec, 1e-9))
    return metrics


def chance_metrics(query_pids: np.ndarray, gallery_pids: np.ndarray, draws: int = 5
                   ) -> dict[str, float]:
  """Expected metrics of a random ranking: the mean over `draws` random-feature rankings."""
  rng = np.random.default_rng(0)
  total: dict[str, float] = {}
  for _ in range(draws):
    q = rng.standard_normal((len(query_pids), 16)).astype(np.float32)
    g = rng.standard_normal((len(gallery_pids), 16)).astype(np.float32)
    for k, v in retrieval_metrics_from_features(q, g, query_pids, gallery_pids).items():
      total[k] = total.get(k, 0.0) + float(v) / draws
  return total


def _format_metrics(m: dict[str, float]) -> str:
  return "  ".join(f"{k} {m[k]:.2f}" for k in ("R1", "R5", "R10", "mAP", "mINP") if k in m)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint) and evaluates it."""
  mesh = sharding.make_mesh()
  paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    paths.write_text_atomic(paths.resolve(workdir) / "config.json",
                            config.to_json_best_effort(indent=2))
  setup = data_setup.setup_data(config)
  info = pipeline.dataset_info(data_dir=setup.data_dir, dataset=setup.dataset)
  clip_cfg = clip_config_from(config, setup.tokenizer)
  method = build_method(config, clip_config=clip_cfg, num_classes=info.num_classes,
                        steps_per_epoch=info.num_train_captions // config.train.batch_size)
  eval_kwargs = dict(data_dir=setup.data_dir, dataset=setup.dataset, tokenizer=setup.tokenizer,
                     batch_size=config.data.eval_batch_size, image_size=clip_cfg.image_size,
                     process_index=jax.process_index(), process_count=jax.process_count())
  test = Evaluator(method, pipeline.make_eval_data(split="test", **eval_kwargs), mesh, "test")
  if config.eval_only:
    return _eval_only(config, method, test, mesh, workdir)

  batch = config.train.batch_size
  if batch % jax.device_count():
    raise ValueError(f"config.train.batch_size={batch} must be divisible by the "
                     f"{jax.device_count()} devices")
  steps_per_epoch = info.num_train_captions // batch
  if steps_per_epoch == 0:
    raise ValueError(f"the training split has {info.num_train_captions} captions, fewer than "
                     f"one batch of {batch}")
  total_steps = steps_per_epoch * config.train.num_epochs
  if config.train.max_steps:
    total_steps = min(total_steps, config.train.max_steps)

  params = (init_params(method, config, mesh) if not config.init_from else
            jax.device_put(checkpointing.load_params(
                config.init_from, jax.eval_shape(method.init, jax.random.key(0))),
                sharding.replicated(mesh)))
  tx, schedule = optimizer.make_optimizer(params, config.optim, steps_per_epoch=steps_per_epoch,
                                          num_epochs=config.train.num_epochs)
  state = jax.jit(lambda p: create_train_state(p, tx, jax.random.key(config.seed + 1)),
                  out_shardings=sharding.replicated(mesh))(params)
  del params

  attribute_words = None
  if config.data.masking == "attribute":
    from tipr_jax.data.masking import load_attribute_words
    path = config.data.attribute_words or os.path.join(setup.source_root or "", "CUHK-PEDES",
                                                       "attribute_words.txt")
    attribute_words = load_attribute_words(path)
  train_iter = pipeline.make_train_iterator(
      data_dir=setup.data_dir, dataset=setup.dataset, tokenizer=setup.tokenizer,
      global_batch_size=batch, seed=config.seed, image_size=clip_cfg.image_size,
      augment=config.data.augment, masking=config.data.masking, mask_prob=config.data.mask_prob,
      attribute_words=attribute_words, num_workers=config.data.num_workers,
      process_index=jax.process_index(), process_count=jax.process_count())

  ckpt = checkpointing.TrainCheckpointer(workdir, save_every_steps=config.train.checkpoint_every_steps,
                                         keep=config.train.keep_checkpoints)
  best_ckpt = checkpointing.BestCheckpointer(workdir)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state, train_iter)
    log(f"resumed from {ckpt.directory}/{int(state.step)}")

  best_split = "val" if config.train.best_split == "val" and "val" in info.splits else "test"
  selector = test if best_split == "test" else Evaluator(
      method, pipeline.make_eval_data(split="val", **eval_kwargs), mesh, "val")
  if config.train.best_split == "val" and best_split == "test":
    log(f"{setup.dataset} has no validation split: the best epoch is chosen on test")

  step_fn = jit_train_step(make_train_step(method, tx, config, schedule),
                           sharding.replicated(mesh), sharding.batch_sharded(mesh),
                           sharding.replicated(mesh))
  writer = reporting.MetricsWriter(workdir)
  flops_per_pair = throughput.train_flops_per_pair_from_config(config, clip_cfg, info.num_classes)
  progress = reporting.Progress(total_steps, batch, start_step=int(state.step),
                                flops_per_pair=flops_per_pair, num_devices=jax.device_count(),
                                device_kind=jax.devices()[0].device_kind)
  log(f"training {total_steps} steps ({steps_per_epoch} per epoch, global batch {batch}, "
      f"{jax.device_count()} devices, {jax.process_count()} processes)")

  pending = None  # (step, metrics on device): read one step late so the host never blocks
  step = start = int(jax.device_get(state.step))
  while step < total_steps:
    local = next(train_iter)
    batch_log.record_train(step + 1, local)  # no-op unless TIPR_DEBUG_BATCH_LOG is set
    state, metrics = step_fn(state, sharding.global_batch(local, mesh))
    step += 1
    if step == start + 1:  # the first step compiles: time the rest
      jax.block_until_ready(metrics)
      progress.mark_compiled(step)
    if pending is not None:
      _report(pending, writer, progress, steps_per_epoch, config)
    pending = (step, metrics)
    if step % config.train.checkpoint_every_steps == 0 or step == total_steps:
      _report(pending, writer, progress, steps_per_epoch, config)
      pending = None
      ckpt.save(step, state, train_iter, force=step == total_steps)
    if step % steps_per_epoch == 0 and (step // steps_per_epoch) % config.train.eval_every_epochs == 0:
      _epoch_eval(selector, state, step, steps_per_epoch, writer, best_ckpt)
  if pending is not None:
    _report(pending, writer, progress, steps_per_epoch, config)

  results = _final_report(config, workdir, method, state, test, selector, best_ckpt, writer)
  writer.close()
  ckpt.close()
  best_ckpt.close()
  return results


def _report(pending, writer, progress, steps_per_epoch, config) -> None:
  step, metrics = pending
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not m.get("finite", 1.0):
    raise NonFiniteLossError(
        f"non-finite loss at step {step} (loss={m.get('loss')}, grad_norm={m.get('grad_norm')}); "
        f"the update was skipped and the last good checkpoint kept. Try a lower config.optim.lr.")
  if step % config.train.log_every_steps == 0 or step == 1:
    m.update(progress.throughput(step))
    writer.write(step, m)
    log(progress.line(step, (step - 1) // steps_per_epoch + 1, m))


def _epoch_eval(selector: Evaluator, state, step, steps_per_epoch, writer, best_ckpt) -> None:
  epoch = step // steps_per_epoch
  m = selector(state.params)
  writer.write(step, dict(m, epoch=epoch), kind=selector.split)
  log(f"epoch {epoch} {selector.split}: {_format_metrics(m)}")
  best = best_ckpt.best()
  if best is None or m["R1"] > best[1]["R1"]:
    best_ckpt.save(step, state.params, dict(m, epoch=epoch, split=selector.split))


def _final_report(config, workdir, method, state, test: Evaluator, selector: Evaluator,
                  best_ckpt, writer) -> dict:
  last = test(state.params)
  step = int(state.step)
  writer.write(step, last, kind="test_final")
  results = {"last": dict(last, step=step)}
  best = best_ckpt.best()
  if best is not None:
    best_step, best_sel = best
    if best_step == step:
      best_test = last
    else:
      params = checkpointing.load_params(workdir, jax.eval_shape(
          method.init, jax.random.key(0)))
      best_test = test(jax.device_put(params, sharding.replicated(test.mesh)))
    results["best"] = dict(best_test, step=best_step, epoch=best_sel.get("epoch"),
                           chosen_on=selector.split, selection_R1=best_sel["R1"])
  results["chance"] = chance_metrics(test.data.query_pids, test.data.gallery_pids)
  results["config"] = json.loads(config.to_json_best_effort())
  if jax.process_index() == 0:
    paths.write_text_atomic(paths.resolve(workdir) / "results.json",
                            json.dumps(results, indent=2))
    reporting.plot_curves(workdir)
  log(f"test (last, step {step}):  {_format_metrics(last)}")
  if "best" in results:
    log(f"test (best on {selector.split}, step {results['best']['step']}):  "
        f"{_format_metrics(results['best'])}")
  log(f"chance level:              {_format_metrics(results['chance'])}")
  return results


def _eval_only(config, method, test: Evaluator, mesh, workdir) -> dict:
  if not config.init_from:
    raise ValueError("config.eval_only=True needs --config.init_from=PATH (a training workdir "
                     "or checkpoint)")
  params = checkpointing.load_params(config.init_from,
                                     jax.eval_shape(method.init, jax.random.key(0)))
  m = test(jax.device_put(params, sharding.replicated(mesh)))
  log(f"test: {_format_metrics(m)}")
  if jax.process_index() == 0:
    paths.write_text_atomic(paths.resolve(workdir) / "results.json", json.dumps(
        {"eval_only": m, "init_from": config.init_from,
         "config": json.loads(config.to_json_best_effort())}, indent=2))
  return {"eval_only": m}
