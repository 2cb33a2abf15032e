"""IRRA trained from scratch on the procedural synthetic pedestrians (the README's main job).

The dataset (CUHK-PEDES layout) and its tokenizer are generated under data/ on first use. The model
is a small CLIP trained from scratch, sized to finish on a 2-core CPU in about ten minutes.
Presets: `configs/synthetic.py:smoke`.
"""
from configs import base
from configs import presets


def get_config(arg: str | None = None):
  c = base.irra_config()
  c.data.dataset = "synthetic"
  c.data.manual_dir = "data/synthetic"
  c.data.synthetic.identities = 600
  c.data.synthetic.images_per_identity = 4
  c.data.synthetic.seed = 0
  c.data.synthetic.image_size = (192, 64)
  c.data.num_workers = 2
  c.data.eval_batch_size = 256
  c.model.clip = presets.small_clip(image_size=(96, 32))
  c.model.cmt_depth = 2
  # From scratch, a softer temperature than the reference's 0.02 (tuned for pretrained CLIP)
  # gets the contrastive loss off its plateau sooner.
  c.model.temperature = 0.05
  c.train.batch_size = 64
  c.train.num_epochs = 8
  c.train.log_every_steps = 60
  c.train.checkpoint_every_steps = 200
  c.optim.lr = 5e-4
  c.optim.eps = 1e-8
  c.optim.warmup_epochs = 1
  c.optim.lr_factor = 1.0
  c.optim.bias_lr_factor = 1.0
  c.optim.schedule_unit = "step"
  return presets.apply(c, arg)
