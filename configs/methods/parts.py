"""Part-level cross-modal correspondence (seed 003; spec seed-methods.md §D) on a dataset.

  python launch.py --config=configs/methods/parts.py:cuhk --workdir=runs/parts_cuhk
  arg = <dataset>[,smoke]   dataset: synthetic | cuhk | icfg | rstp

The paper's code is not public; the recipe is PLOT's (same group, the spec's prior): Adam lr 5e-6
with lr x20 for new modules (RSTPReid: lr 5e-7, x130), bias lr x2, eps 1e-3, temperature 0.015,
batch 128, 60 epochs, warm-up 5, 8 part queries, part losses from epoch 15 (`start_metric`).
New modules: the IRRA heads (cross*, classifier, mlm_head) and `part_decoder`.
'synthetic' keeps the synthetic IRRA recipe (configs/synthetic.py) and adds the decoder and the
part losses (from epoch 3 of 12, the same quarter of the run as 15 of 60).
"""
from ml_collections import config_dict

from configs import presets
from configs.methods import datasets


def parts_section() -> config_dict.ConfigDict:
  """The part decoder and part-loss switches (defaults: docs/methods_fine_grained.md §4)."""
  return config_dict.ConfigDict(dict(
      num_queries=8,
      layers=2,                    # shared transformer over the queries
      heads=0,                     # 0: embed_dim // 64
      image_cls=True,              # decoder reads [CLS] + patches (the spec's 193 tokens)
      start_epoch=15,              # part losses on from this many finished epochs
      part_loss="sdm",             # sdm | infonce, on sum_k w_k s_k
      part_sdm_reduce="mean",      # with uniform weights: mean (1/K) | sum
      train_weights="predicted",   # predicted (text_slot_classifier) | uniform
      cmr_base_margin=0.2,
      cmr_floor=0.05,
      cmr_commonality="mean",      # mean | softmax
      cmr_scope="batch",           # batch | anchor
      cmr_temperature=1.0,
      cmr_negatives="hardest_semi_hard",  # hardest_semi_hard | all_semi_hard
      cmr_fallback="skip",         # skip | hardest
      inference="combined",        # combined (global + parts) | global
      inference_weights="predicted",  # predicted | uniform
      part_scale=1.0,              # S = S_global + part_scale * sum_k w_k s_k
  ))


def get_config(arg: str | None = None):
  dataset, rest = datasets.split_arg(arg, "configs/methods/parts.py")
  datasets.check_presets(rest, ("smoke",), "configs/methods/parts.py")
  c = datasets.dataset_config(dataset)
  c.method = "parts"
  c.parts = parts_section()
  c.losses.part = 1.0
  c.losses.cmr = 1.0
  c.optim.high_lr_keys = ("cross", "part_decoder")
  if dataset == "synthetic":
    c.parts.start_epoch = 3
  else:  # PLOT's recipe
    c.model.temperature = 0.015
    c.optim.lr = 5e-7 if dataset == "rstp" else 5e-6
    c.optim.lr_factor = 130.0 if dataset == "rstp" else 20.0
    c.optim.bias_lr_factor = 2.0
    c.optim.eps = 1e-3
    c.train.batch_size = 128
    c.train.num_epochs = 60
  c = presets.apply(c, ",".join(rest))
  if "smoke" in rest:
    c.parts.num_queries = 4
    c.parts.layers = 1
    c.parts.start_epoch = 1  # the second of the two smoke epochs trains the part losses
  return c
