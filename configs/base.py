"""The IRRA reference recipe (irra-reference.md §1, §7) as an ml_collections config.

Dataset files (cuhk.py, icfg.py, rstp.py, synthetic.py) start from `irra_config()` and set their
dataset; presets such as `configs/cuhk.py:smoke` shrink it for tests.
"""
from __future__ import annotations

from ml_collections import config_dict


def clip_vit_b16(image_size=(384, 128)) -> config_dict.ConfigDict:
  """CLIP ViT-B/16 + 12-layer 512-wide text tower (the reference backbone)."""
  return config_dict.ConfigDict(dict(
      embed_dim=512, image_size=tuple(image_size), patch_size=16, stride_size=16,
      vision_width=768, vision_layers=12, vision_heads=12, context_length=77, vocab_size=49408,
      text_width=512, text_layers=12, text_heads=8, dtype="float32"))
# vocab_size 0 means "the tokenizer's vocabulary size" (models trained from scratch).


def irra_config() -> config_dict.ConfigDict:
  """Everything the reference's published command sets (batch 64, 60 epochs, sdm+id+mlm)."""
  c = config_dict.ConfigDict()
  c.method = "irra"
  c.seed = 1
  c.eval_only = False
  # A training workdir or checkpoint to take the model parameters from (eval_only, fine-tuning).
  c.init_from = config_dict.placeholder(str)
  # A CLIP checkpoint: Hugging Face dir, OpenAI .pt, or a dir from `python -m tipr_jax.models.convert`.
  c.pretrained = config_dict.placeholder(str)
  c.pos_embed_interpolation = "bilinear"

  c.model = config_dict.ConfigDict()
  c.model.clip = clip_vit_b16()
  c.model.cmt_depth = 4
  c.model.temperature = 0.02  # logit scale 1/0.02 = 50, fixed

  c.data = config_dict.ConfigDict()
  c.data.dataset = "cuhk_pedes"  # cuhk_pedes | icfg_pedes | rstpreid | synthetic
  c.data.manual_dir = "data/raw"  # holds CUHK-PEDES/, ICFG-PEDES/ or RSTPReid/ as distributed
  c.data.data_dir = "data/tfds"   # prepared TFDS (ArrayRecord) datasets
  # Tokenizer vocabulary: a HF CLIP dir, bpe_simple_vocab_16e6.txt.gz, or a converted checkpoint dir.
  # Unset: taken from `pretrained`.
  c.data.tokenizer = config_dict.placeholder(str)
  c.data.augment = True           # --img_aug in the published runs
  c.data.masking = "mlm"          # mlm | attribute | none
  c.data.mask_prob = 0.15
  c.data.attribute_words = config_dict.placeholder(str)
  c.data.num_workers = 2
  c.data.eval_batch_size = 512
  c.data.synthetic = config_dict.ConfigDict(dict(identities=0, images_per_identity=4, seed=0,
                                                 image_size=(384, 128)))

  # Loss weights; 0 switches a loss off (the published runs: sdm + id + mlm).
  c.losses = config_dict.ConfigDict(dict(sdm=1.0, id=1.0, mlm=1.0, itc=0.0, cmpm=0.0))
  # The reference's published runs feed the MASKED caption to SDM and ID (its aliasing bug,
  # irra-reference.md §4). False: the clean caption, at the cost of a second text pass.
  c.masked_caption_for_global = True
  # MLM head runs only on up to this many masked positions per caption (falls back to all
  # positions, with identical results, when a caption has more).
  c.mlm_positions_cap = 16

  c.optim = config_dict.ConfigDict()
  c.optim.name = "adam"
  c.optim.lr = 1e-5
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-3
  c.optim.weight_decay = 4e-5
  c.optim.weight_decay_bias = 0.0
  c.optim.lr_factor = 5.0
  c.optim.bias_lr_factor = 2.0
  c.optim.high_lr_keys = ("cross",)
  c.optim.head_keys = ("classifier", "mlm_head")
  c.optim.schedule = "cosine"
  c.optim.schedule_unit = "epoch"  # epoch (the reference) | step
  c.optim.warmup_epochs = 5
  c.optim.warmup_factor = 0.1
  c.optim.target_factor = 0.0
  c.optim.grad_clip_norm = 0.0

  c.train = config_dict.ConfigDict()
  c.train.batch_size = 64          # global batch, over all devices of all hosts
  c.train.grad_accum_steps = 1     # micro-batches per step; the loss still sees the whole batch
  c.train.num_epochs = 60
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 1000
  c.train.keep_checkpoints = 3
  c.train.eval_every_epochs = 1
  c.train.best_split = "val"       # val (where the dataset has one) | test (the reference)
  c.train.max_steps = 0            # >0: stop early (smoke tests)
  return c
