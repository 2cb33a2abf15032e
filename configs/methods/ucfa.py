"""UCFA (uncertainty-aware coarse-to-fine alignment; spec seed-methods.md §A) on a dataset.

  python launch.py --config=configs/methods/ucfa.py:cuhk --workdir=runs/ucfa_cuhk
  arg = <dataset>[,<preset>...]   dataset: synthetic | cuhk | icfg | rstp

Defaults = the spec's reconstruction (docs/methods_probabilistic.md): DCL (expected cosine in SDM
form) + PCL (inter + intra sample points) + UAMLR (attribute words masked, MLM head over K = 3
sampled image token sequences) + 0.1 x entropy margin regularizer (margin 300 at D = 512), no ID,
duplicated-last-block head, mean-only inference. The optimizer, schedule and budget are the
dataset's IRRA recipe (configs/<dataset>.py), so 'synthetic' compares with IRRA at the same budget.
Presets (combinable): fused (inference fused with the sample similarity, weight 0.1), mlp (light
MLP head), w2 (2-Wasserstein DCL), kl (KL to N(0, I), weight 1e-3, instead of the entropy margin),
feature (OMRE's feature-regression reconstruction), id (+ ID loss), omre (OMRE's total:
boma + hnm + crsr + reg with BERT masking and fused inference), smoke (tiny, for tests).
"""
from ml_collections import config_dict

from configs import presets
from configs.methods import datasets

PRESETS = ("fused", "mlp", "w2", "kl", "feature", "id", "omre", "smoke")


def ucfa_section() -> config_dict.ConfigDict:
  """config.ucfa: the switches read by tipr_jax/methods/ucfa.py."""
  return config_dict.ConfigDict(dict(
      num_samples=3,                 # K samples per distribution (spec §A, OMRE sample_num)
      head="block",                  # block (duplicated last block, shared form) | mlp
      omre_mlp_input=False,          # block head: OMRE's ResidualAttentionBlock2 body
      mlp_hidden_dim=0,              # mlp head: hidden width (0: embed_dim)
      # None: 0.1 above the entropy margin's floor (regularizer inactive at init), -4 with KL.
      log_sigma_init=config_dict.placeholder(float),
      similarity="expected_cosine",  # DCL similarity: expected_cosine (boma) | wasserstein
      intra_weight=1.0,              # PCL = inter + intra_weight * intra
      variance_reg="entropy",        # entropy (margin) | kl; weight = losses.reg
      entropy_margin=300.0,          # given for D = 512 (OMRE)
      entropy_margin_scale_with_dim=True,  # margin * D / 512: the same sigma floor at any width
      exact_std_entropy=False,       # False: the spec's H (coefficient 1/2), see the losses doc
      hnm_margin=0.2,                # hinge triplet (losses.hnm > 0)
      reconstruction="mlm",          # mlm (CE on masked words) | feature (OMRE crsr, cosine)
      inference="mean",              # mean | fused
      fusion_weight=0.1,             # fused: (1 - w) cos(mu) + w S_prob
      fusion_prob_as_sum=True,       # S_prob as OMRE's sum over samples (x 2K) or the mean
      eval_num_samples=0,            # samples per item at inference (0: num_samples)
      eval_seed=0,                   # fixed inference noise (shared by all items of a modality)
  ))


def get_config(arg: str | None = None):
  dataset, rest = datasets.split_arg(arg, "configs/methods/ucfa.py")
  datasets.check_presets(rest, PRESETS, "configs/methods/ucfa.py")
  c = datasets.dataset_config(dataset)
  c.method = "ucfa"
  c.ucfa = ucfa_section()
  c.losses = config_dict.ConfigDict(dict(
      dcl=1.0, pcl=1.0, uamlr=1.0, reg=0.1, hnm=0.0, id=0.0, sdm=0.0, mlm=0.0, itc=0.0,
      cmpm=0.0))
  c.data.masking = "attribute"     # UAMLR masks attribute words
  c.data.mask_prob = 0.15          # per attribute word (at least one word is masked)
  if dataset != "synthetic":       # the synthetic data ships attribute_words.txt beside it
    c.data.attribute_words = "data/attribute_words.txt"
  for name in rest:
    if name == "fused":
      c.ucfa.inference = "fused"
    elif name == "mlp":
      c.ucfa.head = "mlp"
    elif name == "w2":
      c.ucfa.similarity = "wasserstein"
    elif name == "kl":
      c.ucfa.variance_reg = "kl"
      c.losses.reg = 1e-3
    elif name == "feature":
      c.ucfa.reconstruction = "feature"
    elif name == "id":
      c.losses.id = 1.0
    elif name == "omre":
      c.losses.pcl = 0.0
      c.losses.hnm = 1.0
      c.ucfa.reconstruction = "feature"
      c.ucfa.inference = "fused"
      c.data.masking = "mlm"
  return presets.apply(c, ",".join(n for n in rest if n == "smoke"))
