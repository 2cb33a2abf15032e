"""A PyTorch re-implementation of the reference IRRA model, loss and optimizer (baseline for benchmarks).

Written from spec/irra-reference.md (§2 model, §3 losses, §7 optimizer), with the reference's compute:
CLIP ViT (ln_post + proj on all tokens) and causal text tower of nn.MultiheadAttention blocks, TWO text
passes (clean caption for SDM/ID, masked caption for MLM), cross-attention + `cmt_depth` blocks + MLM
head over ALL context positions, SDM + ID + MLM losses, and torch.optim.Adam with one param group per
tensor (eps 1e-3, coupled L2, the §7 lr rules). Float32 parameters; `autocast=True` runs forward and
loss under bfloat16 CPU autocast. Tensors are batch-first; images NCHW.
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import nn

from tipr_jax.models.clip import CLIPConfig


class QuickGELU(nn.Module):
  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1 x); x + mlp(ln_2 x)."""

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width)
    self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
    self.ln_2 = nn.LayerNorm(width)
    self.mlp = nn.Sequential(collections.OrderedDict(
        c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))

  def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
  def __init__(self, width: int, layers: int, heads: int):
    super().__init__()
    self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

  def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    for block in self.resblocks:
      x = block(x, mask)
    return x


class VisionTransformer(nn.Module):
  """[B,3,H,W] -> [B, 1+gh*gw, embed_dim]."""

  def __init__(self, c: CLIPConfig):
    super().__init__()
    d = c.vision_width
    scale = d ** -0.5
    self.conv1 = nn.Conv2d(3, d, c.patch_size, c.stride_size, bias=False)
    self.class_embedding = nn.Parameter(scale * torch.randn(d))
    self.positional_embedding = nn.Parameter(scale * torch.randn(c.num_image_tokens, d))
    self.ln_pre = nn.LayerNorm(d)
    self.transformer = Transformer(d, c.vision_layers, c.vision_heads)
    self.ln_post = nn.LayerNorm(d)
    self.proj = nn.Parameter(scale * torch.randn(d, c.embed_dim))

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = self.conv1(images).flatten(2).transpose(1, 2)
    cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
    x = self.transformer(self.ln_pre(x))
    return self.ln_post(x) @ self.proj


class TextTransformer(nn.Module):
  """[B,L] ids -> [B,L,embed_dim], causal."""

  def __init__(self, c: CLIPConfig):
    super().__init__()
    d = c.text_width
    self.token_embedding = nn.Embedding(c.vocab_size, d)
    nn.init.normal_(self.token_embedding.weight, std=0.02)
    self.positional_embedding = nn.Parameter(0.01 * torch.randn(c.context_length, d))
    self.transformer = Transformer(d, c.text_layers, c.text_heads)
    self.ln_final = nn.LayerNorm(d)
    self.text_projection = nn.Parameter(d ** -0.5 * torch.randn(d, c.embed_dim))
    mask = torch.full((c.context_length, c.context_length), float("-inf")).triu_(1)
    self.register_buffer("attn_mask", mask, persistent=False)

  def forward(self, ids: torch.Tensor) -> torch.Tensor:
    x = self.token_embedding(ids) + self.positional_embedding
    x = self.transformer(x, self.attn_mask)
    return self.ln_final(x) @ self.text_projection


class BaseModel(nn.Module):
  def __init__(self, c: CLIPConfig):
    super().__init__()
    self.visual = VisionTransformer(c)
    self.text = TextTransformer(c)

  def encode_image(self, images: torch.Tensor) -> torch.Tensor:
    return self.visual(images)[:, 0].float()

  def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
    x = self.text(ids)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)].float()


class IRRATorch(nn.Module):
  """The reference IRRA model (§2): base_model, cross_attn, cross_modal_transformer, heads."""

  def __init__(self, c: CLIPConfig, num_classes: int, cmt_depth: int = 4):
    super().__init__()
    d = c.embed_dim
    self.config = c
    self.base_model = BaseModel(c)
    self.classifier = nn.Linear(d, num_classes)
    nn.init.normal_(self.classifier.weight, std=0.001)
    nn.init.zeros_(self.classifier.bias)
    heads = max(d // 64, 1)
    self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
    self.cross_modal_transformer = Transformer(d, cmt_depth, heads)
    self.ln_pre_t = nn.LayerNorm(d)
    self.ln_pre_i = nn.LayerNorm(d)
    self.ln_post = nn.LayerNorm(d)
    self.mlm_head = nn.Sequential(collections.OrderedDict(
        dense=nn.Linear(d, d), gelu=QuickGELU(), ln=nn.LayerNorm(d), fc=nn.Linear(d, c.vocab_size)))
    scale = d ** -0.5
    proj_std = scale * (2 * cmt_depth) ** -0.5
    for block in self.cross_modal_transformer.resblocks:
      nn.init.normal_(block.attn.in_proj_weight, std=scale)
      nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
      nn.init.normal_(block.mlp.c_fc.weight, std=(2 * d) ** -0.5)
      nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(self.cross_attn.in_proj_weight, std=scale)
    nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
    nn.init.normal_(self.mlm_head.dense.weight, std=(2 * d) ** -0.5)
    nn.init.normal_(self.mlm_head.fc.weight, std=proj_std)

  def cross_former(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    kv = self.ln_pre_i(kv)
    x = self.cross_attn(self.ln_pre_t(q), kv, kv, need_weights=False)[0]
    return self.ln_post(self.cross_modal_transformer(x))

  def forward(self, batch: dict[str, torch.Tensor], logit_scale: float = 50.0) -> torch.Tensor:
    """Total loss sdm + id + mlm for one batch (the reference's two text passes)."""
    image_feats = self.base_model.visual(batch["images"])
    ids = batch["caption_ids"]
    text_feats = self.base_model.text(ids)
    i_feats = image_feats[:, 0].float()
    t_feats = text_feats[torch.arange(ids.shape[0]), ids.argmax(dim=-1)].float()
    pids = batch["pids"]
    loss = sdm_loss(i_feats, t_feats, pids, logit_scale)
    loss = loss + 0.5 * (F.cross_entropy(self.classifier(i_feats).float(), pids)
                         + F.cross_entropy(self.classifier(t_feats).float(), pids))
    mlm_feats = self.base_model.text(batch["mlm_ids"])  # second text pass
    x = self.mlm_head(self.cross_former(mlm_feats, image_feats))
    scores = x.float().reshape(-1, self.config.vocab_size)
    return loss + F.cross_entropy(scores, batch["mlm_labels"].reshape(-1), ignore_index=0)


def sdm_loss(i: torch.Tensor, t: torch.Tensor, pids: torch.Tensor, logit_scale: float,
             epsilon: float = 1e-8) -> torch.Tensor:
  """§3 SDM: KL(softmax || normalized identity labels) in both directions, summed."""
  labels = (pids[:, None] == pids[None, :]).float()
  i_n = i / i.norm(dim=1, keepdim=True)
  t_n = t / t.norm(dim=1, keepdim=True)
  t2i = logit_scale * t_n @ i_n.t()
  q = labels / labels.sum(dim=1)
  log_q = torch.log(q + epsilon)

  def kl(logits):
    return (F.softmax(logits, 1) * (F.log_softmax(logits, 1) - log_q)).sum(1).mean()

  return kl(t2i.t()) + kl(t2i)


def make_adam(model: nn.Module, lr: float = 1e-5, weight_decay: float = 4e-5,
              lr_factor: float = 5.0, bias_lr_factor: float = 2.0) -> torch.optim.Adam:
  """§7: one param group per tensor, rules applied in order; Adam eps 1e-3, coupled L2."""
  groups = []
  for name, p in model.named_parameters():
    g_lr, g_wd = lr, weight_decay
    if "cross" in name:
      g_lr = lr * lr_factor
    if "bias" in name:
      g_lr, g_wd = lr * bias_lr_factor, 0.0
    if "classifier" in name or "mlm_head" in name:
      g_lr = lr * lr_factor
    groups.append(dict(params=[p], lr=g_lr, weight_decay=g_wd))
  return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-3)


def train_step(model: IRRATorch, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               autocast: bool = False) -> float:
  """One reference training step; returns the loss."""
  opt.zero_grad(set_to_none=True)
  with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
    loss = model(batch)
  loss.backward()
  opt.step()
  return float(loss.detach())


def to_torch_batch(batch: dict) -> dict[str, torch.Tensor]:
  """A numpy batch (images NHWC float32, int ids) -> torch tensors (images NCHW, ids int64)."""
  out = {k: torch.from_numpy(v).long() for k, v in batch.items() if k != "images"}
  out["images"] = torch.from_numpy(batch["images"]).permute(0, 3, 1, 2).contiguous()
  return out


def num_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())

