"""IRRA's training losses (SDM, ITC, CMPM, ID, MLM) as pure vectorized jnp functions.

Every function returns a scalar equal to the reference's formula (IRRA `model/objectives.py`, summarised
in spec/irra-reference.md §3), including its quirks. Inputs are cast to at least float32 (the reference
calls `.float()` on features and logits); float64 inputs stay float64.

Sharding: the functions also run on batch-sharded arrays under an Explicit-axes mesh. Cross-batch
matmuls gather one operand first (`_replicated`), diagonals are `sum(x * y)`, and no function uses
`jnp.diag` or indexes the batch with `arange`.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array


def _replicated(x: Array) -> Array:
  """All-gathers `x` if it is sharded under an Explicit mesh; returns it unchanged otherwise."""
  spec = jax.typeof(x).sharding.spec
  if any(axis is not None for axis in spec):
    return jax.sharding.reshard(x, P())
  return x


def _as_float(x) -> Array:
  """Casts to at least float32 (like the reference's `.float()`), keeping float64."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _l2_normalize_no_eps(x: Array) -> Array:
  """x / ||x||_2 over the last axis with no epsilon, as the reference does inside its losses.

  A zero row gives NaN here exactly as in the reference (0 / 0); IRRA's features are never exactly
  zero, and a silent clamp would change the loss and its gradient for near-zero rows.
  """
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _same_pid(pids: Array) -> Array:
  """labels[a, b] = 1.0 if pids[a] == pids[b] else 0.0, float32 always, [B, B]."""
  pids = jnp.asarray(pids)
  return (pids[:, None] == _replicated(pids)[None, :]).astype(jnp.float32)


def _kl_rows(logits: Array, log_q: Array, axis: int) -> Array:
  """mean over the other axis of sum_axis softmax(logits) * (log_softmax(logits) - log_q)."""
  log_p = jax.nn.log_softmax(logits, axis=axis)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis))


def sdm(image_feats: Array, text_feats: Array, pids: Array, logit_scale: float | Array = 50.0,
        epsilon: float = 1e-8) -> Array:
  """Similarity distribution matching loss (IRRA `compute_sdm`), a scalar.

  image_feats, text_feats: [B, D] un-normalized features of the B pairs; pids: [B] identity of pair b.
  With i_n, t_n the L2-normalized features (no eps), t2i = logit_scale * t_n @ i_n.T, i2t = t2i.T and
  labels[a, b] = [pid_a == pid_b] (float32 even for float64 features, as in the reference):

    q    = labels / labels.sum(axis=1)      # numpy/torch broadcasting: divides column b by count(pid_b)
    loss = mean_a sum_b p_i2t[a,b] (log p_i2t[a,b] - log(q[a,b] + eps))
         + mean_a sum_b p_t2i[a,b] (log p_t2i[a,b] - log(q[a,b] + eps))

  with p = softmax over b. The two KL directions are summed (not averaged), negatives are not masked
  (they contribute p * (log p - log eps)), and log(q + eps) is evaluated in float32.

  Why the broadcasting equals row normalisation: labels.sum(axis=1) has shape [B] and broadcasts over
  the last axis, so q[a, b] = labels[a, b] / count(pid_b). labels[a, b] is nonzero only when
  pid_a == pid_b, and then count(pid_b) == count(pid_a) exactly (both are integer-valued sums), so
  q[a, b] = labels[a, b] / sum_c labels[a, c]: each row is the uniform distribution over the
  same-identity columns. The same argument shows q is exactly symmetric, which is used here: the i2t
  term is evaluated in the t2i frame as a column softmax (softmax(i2t, axis=1) == softmax(t2i, axis=0).T
  and q.T == q), so all [B, B] arrays keep one layout under a batch-sharded Explicit mesh.
  """
  i_n = _l2_normalize_no_eps(_as_float(image_feats))
  t_n = _l2_normalize_no_eps(_as_float(text_feats))
  t2i = logit_scale * (t_n @ _replicated(i_n).T)  # [B_text, B_image]
  labels = _same_pid(pids)
  q = labels / _replicated(labels.sum(axis=1))  # reference broadcasting, see docstring
  log_q = jnp.log(q + epsilon)  # float32, like the reference
  t2i_loss = _kl_rows(t2i, log_q, axis=1)
  i2t_loss = _kl_rows(t2i, log_q, axis=0)  # == _kl_rows(t2i.T, log_q, axis=1) since q == q.T
  return i2t_loss + t2i_loss


def itc(image_feats: Array, text_feats: Array, logit_scale: float | Array) -> Array:
  """Symmetric InfoNCE (IRRA `compute_itc`), a scalar; image_feats, text_feats: [B, D].

  logits = logit_scale * i_n @ t_n.T (normalized without eps); loss = (CE(logits, arange(B)) +
  CE(logits.T, arange(B))) / 2 with mean reduction. The diagonal is computed as sum(i_n * t_n, -1).
  """
  i_n = _l2_normalize_no_eps(_as_float(image_feats))
  t_n = _l2_normalize_no_eps(_as_float(text_feats))
  logits = logit_scale * (i_n @ _replicated(t_n).T)  # [B_image, B_text]
  diag = logit_scale * jnp.sum(i_n * t_n, axis=-1)  # logits[b, b]
  mean_diag = jnp.mean(diag)
  loss_i = jnp.mean(jax.nn.logsumexp(logits, axis=1)) - mean_diag
  loss_t = jnp.mean(jax.nn.logsumexp(logits, axis=0)) - mean_diag
  return (loss_i + loss_t) / 2


def cmpm(image_feats: Array, text_feats: Array, pids: Array, epsilon: float = 1e-8) -> Array:
  """Cross-modal projection matching loss (IRRA `compute_cmpm`), a scalar.

  image_feats, text_feats: [B, D]; pids: [B]. Projections use the un-normalized side and no logit
  scale: image_proj_text = i @ t_n.T, text_proj_image = t @ i_n.T. The target is the label mask divided
  by its row L2 norm with the reference's broadcasting (q[a, b] = mask[a, b] / sqrt(count(pid_b)), equal
  to mask / sqrt(k) per row for the same reason as in `sdm`), so it sums to sqrt(k), not 1. Loss =
  sum over the two directions of mean_a sum_b p (log p - log(q + eps)), p = softmax over b; the
  label mask and log(q + eps) are float32.
  """
  i = _as_float(image_feats)
  t = _as_float(text_feats)
  i_n = _l2_normalize_no_eps(i)
  t_n = _l2_normalize_no_eps(t)
  image_proj_text = i @ _replicated(t_n).T
  text_proj_image = t @ _replicated(i_n).T
  mask = _same_pid(pids)
  q = mask / _replicated(jnp.linalg.norm(mask, axis=1))
  log_q = jnp.log(q + epsilon)
  return _kl_rows(image_proj_text, log_q, axis=1) + _kl_rows(text_proj_image, log_q, axis=1)


def _cross_entropy_terms(logits: Array, labels: Array) -> Array:
  """Per-row -log softmax(logits)[label]; logits [..., C], labels [...] int."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return lse - picked


def id_loss(image_logits: Array, text_logits: Array, pids: Array) -> Array:
  """Identity classification loss (IRRA `compute_id`), a scalar.

  image_logits, text_logits: [B, num_classes] (the shared classifier on un-normalized features);
  pids: [B] 0-based class indices. (CE_mean(image_logits, pids) + CE_mean(text_logits, pids)) / 2.
  """
  image_logits = _as_float(image_logits)
  text_logits = _as_float(text_logits)
  pids = jnp.asarray(pids)
  return (jnp.mean(_cross_entropy_terms(image_logits, pids))
          + jnp.mean(_cross_entropy_terms(text_logits, pids))) / 2


def mlm_loss(scores: Array, labels: Array) -> Array:
  """Masked-token cross entropy (IRRA `compute_mlm`), a scalar.

  scores: [N, V] or [B, L, V] vocabulary logits; labels: [N] or [B, L] token ids, 0 = ignore.
  Token-level mean over all non-ignored positions of the batch (torch CrossEntropyLoss with
  ignore_index=0). Returns 0 (the reference gives NaN) when no position is labelled.
  """
  scores = _as_float(scores)
  labels = jnp.asarray(labels)
  if scores.shape[:-1] != labels.shape:
    raise ValueError(f"mlm_loss: scores shape {scores.shape} must be labels shape {labels.shape} + (V,)")
  valid = labels != 0
  nll = _cross_entropy_terms(scores, labels)
  total = jnp.sum(jnp.where(valid, nll, 0.0))
  return total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)


def mlm_accuracy(scores: Array, labels: Array) -> Array:
  """Argmax accuracy over the non-ignored positions (labels != 0), a float32 scalar; 0 if none.

  scores: [N, V] or [B, L, V]; labels: [N] or [B, L]. Ties in the argmax take the first index.
  """
  labels = jnp.asarray(labels)
  valid = labels != 0
  correct = (jnp.argmax(scores, axis=-1) == labels) & valid
  return (jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)).astype(jnp.float32)


def gather_masked_positions(labels: Array, cap: int) -> tuple[Array, Array, Array]:
  """Static-shape selection of the labelled MLM positions, so the vocabulary projection runs on them only.

  labels: [B, L] MLM labels (0 = not masked); cap: static number of slots.
  Returns (indices [cap] int32 flat positions into the [B * L] flattened sequence, in increasing
  order; valid [cap] bool, True for the first min(count, cap) slots; overflow: bool scalar, True when
  more than `cap` positions are labelled). Unused slots point at position 0.

  Use: h = hidden.reshape(B * L, d)[indices]; logits = head(h); lab = jnp.where(valid,
  labels.reshape(-1)[indices], 0); mlm_loss(logits, lab) then equals mlm_loss on the full [B, L, V]
  logits. The labels of invalid slots MUST be set to 0 as shown (slot padding may point at a
  labelled position). When `overflow` is True some labelled positions are missing: the caller must
  then fall back to the full projection (e.g. `lax.cond(overflow, full, gathered)`) rather than
  silently dropping tokens. Size `cap` from the masking rate with a wide margin.
  """
  labels = _replicated(jnp.asarray(labels))
  if labels.ndim != 2:
    raise ValueError(f"gather_masked_positions: labels must be [B, L], got shape {labels.shape}")
  if cap < 1:
    raise ValueError(f"gather_masked_positions: cap must be >= 1, got {cap}")
  flat = labels.reshape(-1) != 0
  count = jnp.sum(flat, dtype=jnp.int32)
  (indices,) = jnp.nonzero(flat, size=cap, fill_value=0)
  valid = jnp.arange(cap, dtype=jnp.int32) < count
  return indices.astype(jnp.int32), valid, count > cap
