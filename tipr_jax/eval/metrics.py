"""Retrieval metrics (R@k, mAP, mINP) with IRRA's definitions, without sorting the similarity rows.

Definitions (IRRA `utils/metrics.py::rank`, spec/irra-reference.md §8), per query with the gallery
ordered by decreasing similarity and num_rel positives (same pid) at 1-based ranks r_1 < ... < r_n:
  R@k  = 1 if r_1 <= k (CMC clipped at 1), averaged over queries, in percent;
  AP   = sum_k precision@k * match_k / num_rel = (1 / n) * sum_i i / r_i;
  INP  = num_rel / r_n (rank of the last positive); mAP, mINP are the means, in percent.

Tie rule (deterministic): equal similarities are ordered by gallery index, as a *stable* descending
sort would order them (`np.argsort(-s, kind="stable")`). The reference's `torch.argsort` is not stable,
so on exact ties its order is unspecified; with this rule the results equal a stable-argsort
implementation of the reference's rank() exactly, ties included.

Algorithm: instead of sorting each row (O(G log G) and a [Q, G] index matrix), the rank of every
positive j of a query is computed directly:
  rank_j = 1 + #{g : s_g > s_j} + #{g < j : s_g == s_j},
by comparing the row against each positive's similarity (O(G * num_rel) per query, in a jitted
XLA loop over positives on cache-sized blocks of rows). Queries are processed in chunks, so memory
is O(chunk_size * G); `retrieval_metrics_from_features` computes each chunk's similarities itself
and never holds the [Q, G] matrix. The integer ranks are exact; AP and INP are then computed from
them in float64 on the host (the reference computes in float32: ~1e-7 relative differences).

A query whose pid has no image in the gallery raises ValueError (naming the query index), like the
reference, which fails on such a query. NaN similarities raise ValueError.
"""
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Direction = Literal["t2i", "i2t"]

# Similarity entries per block of rows inside the counting loop (kept in cache while the loop runs
# over the positives), and per host->device chunk when chunk_size is None.
_BLOCK_ELEMENTS = 1 << 21
_CHUNK_ELEMENTS = 1 << 24
_MIN_FEATURE_CHUNK = 512  # query rows per matmul in the features path (keeps the matmul efficient)
_NORMALIZE_EPS = 1e-12  # torch F.normalize default, used by the reference's evaluator


# ----------------------------------------------------------------------------------------------------
# Device kernels


def _count_ranks(sim: jax.Array, pos_idx: jax.Array, n_pos: jax.Array, block_rows: int,
                 first_only: bool) -> tuple[jax.Array, jax.Array]:
  """1-based ranks of the positives of each row, and whether `sim` contains NaN.

  sim: [C, G] float32; pos_idx: [C, P] int32 gallery indices of each row's positives in increasing
  order, the first n_pos[c] valid (padding arbitrary in-range); n_pos: [C] int32. C must be a multiple
  of block_rows. Returns ranks [C, P] int32 (entries beyond n_pos are garbage); with first_only, only
  column 0 is meaningful and holds the rank of the best positive (= rank of the first hit).
  """
  c_rows, g = sim.shape
  p = pos_idx.shape[1]
  thr = jnp.take_along_axis(sim, pos_idx, axis=1)  # [C, P] similarity of each positive
  if first_only:
    valid = jnp.arange(p)[None, :] < n_pos[:, None]
    best = jnp.argmax(jnp.where(valid, thr, -jnp.inf), axis=1)[:, None]  # first max = lowest index
    thr = jnp.take_along_axis(thr, best, axis=1)
    pos_idx = jnp.take_along_axis(pos_idx, best, axis=1)
    n_pos = jnp.minimum(n_pos, 1)
    p = 1
  # Counts are integers; float32 sums are exact below 2**24 and vectorize better on CPU.
  acc_dtype = jnp.float32 if g < (1 << 24) else jnp.int32
  gidx = jnp.arange(g, dtype=jnp.int32)[None, :]

  def block(args):
    s, t, ix, n = args  # [b, G], [b, P], [b, P], [b]

    def body(j, acc):
      tj = lax.dynamic_slice_in_dim(t, j, 1, axis=1)
      ij = lax.dynamic_slice_in_dim(ix, j, 1, axis=1)
      above = (s > tj) | ((s == tj) & (gidx < ij))  # ranked before positive j (stable tie rule)
      cnt = jnp.sum(above.astype(acc_dtype), axis=1, keepdims=True)
      return lax.dynamic_update_slice_in_dim(acc, cnt.astype(jnp.int32), j, axis=1)

    return lax.fori_loop(0, jnp.max(n), body, jnp.zeros(t.shape, jnp.int32))

  nb = c_rows // block_rows
  counts = lax.map(block, (sim.reshape(nb, block_rows, g), thr.reshape(nb, block_rows, p),
                           pos_idx.reshape(nb, block_rows, p), n_pos.reshape(nb, block_rows)))
  return counts.reshape(c_rows, p) + 1, jnp.any(jnp.isnan(sim))


@functools.partial(jax.jit, static_argnames=("block_rows", "first_only"))
def _similarity_chunk_ranks(sim, pos_idx, n_pos, *, block_rows, first_only):
  return _count_ranks(sim.astype(jnp.float32), pos_idx, n_pos, block_rows, first_only)


@functools.partial(jax.jit, static_argnames=("block_rows", "first_only", "normalize"))
def _feature_chunk_ranks(queries, gallery_n, pos_idx, n_pos, *, block_rows, first_only, normalize):
  q = queries.astype(jnp.float32)
  if normalize:
    q = _normalize(q)
  sim = jnp.matmul(q, gallery_n.T, precision=lax.Precision.HIGHEST)
  return _count_ranks(sim, pos_idx, n_pos, block_rows, first_only)


def _normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||_2, 1e-12) over the last axis (torch F.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORMALIZE_EPS)


_normalize_jit = jax.jit(lambda x: _normalize(x.astype(jnp.float32)))


# ----------------------------------------------------------------------------------------------------
# Host-side driver


def _positives(query_pids, gallery_pids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Gallery indices grouped by pid: (order [G], start [Q], count [Q]).

  The positives of query q are order[start[q] : start[q] + count[q]], in increasing gallery index.
  """
  q = np.asarray(query_pids)
  g = np.asarray(gallery_pids)
  if q.ndim != 1 or g.ndim != 1:
    raise ValueError(f"query_pids and gallery_pids must be 1-D, got shapes {q.shape} and {g.shape}")
  order = np.argsort(g, kind="stable")
  uniq, first, counts = np.unique(g[order], return_index=True, return_counts=True)
  k = np.clip(np.searchsorted(uniq, q), 0, len(uniq) - 1)
  missing = np.flatnonzero(uniq[k] != q)
  if missing.size:
    i = int(missing[0])
    raise ValueError(
        f"query {i} (pid {q[i].item()!r}) has no positive in the gallery ({missing.size} such queries); "
        "every query pid must occur in gallery_pids")
  return order, first[k], counts[k]


def _block_rows(g: int) -> int:
  """Rows per block of the counting loop: a power of two with about _BLOCK_ELEMENTS entries, in [1, 256]."""
  b = max(1, _BLOCK_ELEMENTS // max(g, 1))
  return int(min(256, 1 << (b.bit_length() - 1)))


def _chunk_rows(num_queries: int, g: int, chunk_size: int | None, minimum: int = 1) -> tuple[int, int]:
  """(rows per chunk, rows per block): the chunk is a multiple of the block (padding rows are ignored)."""
  if chunk_size is None:
    chunk_size = max(minimum, _CHUNK_ELEMENTS // max(g, 1))
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  rows = min(int(chunk_size), num_queries)
  rows = -(-num_queries // -(-num_queries // rows))  # balanced chunks: one shape, one compilation
  block = min(_block_rows(g), 1 << (rows - 1).bit_length())
  return -(-rows // block) * block, block


def _single_device(x):
  """numpy input as numpy; a jax array on one device as is; a multi-device (sharded) one gathered to host.

  The per-chunk kernels run on one device; multi-host callers pass host (numpy) arrays.
  """
  if isinstance(x, jax.Array):
    return x if len(x.sharding.device_set) == 1 else np.asarray(x)
  return np.asarray(x)


def _check_direction(direction: str) -> None:
  if direction not in ("t2i", "i2t"):
    raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")


def _per_query(num_queries: int, num_gallery: int, query_pids, gallery_pids, chunk_size, first_only,
               min_chunk, sort_by_count, launch) -> dict[str, np.ndarray]:
  """Runs the chunked kernel; returns per-query 'first' (int64) and, unless first_only, 'ap', 'inp'.

  launch(rows [C] int64 query indices (padded rows = -1), pos_idx [C, P], n_pos [C], block, slot)
  dispatches one chunk and returns the (not yet computed) (ranks [C, P], has_nan) device arrays;
  `slot` (0/1) alternates so that a runner can fill one host buffer while the previous chunk is
  computed from the other. With sort_by_count the queries are processed in order of their number of
  positives (tight loop bounds per block); otherwise in index order (contiguous chunks).
  """
  if num_queries == 0 or num_gallery == 0:
    raise ValueError(f"need at least one query and one gallery item, got Q={num_queries}, G={num_gallery}")
  if len(query_pids) != num_queries or len(gallery_pids) != num_gallery:
    raise ValueError(f"query_pids has {len(query_pids)} entries and gallery_pids {len(gallery_pids)}; "
                     f"expected {num_queries} and {num_gallery} to match the similarity / features")
  order, start, count = _positives(query_pids, gallery_pids)
  c_rows, block = _chunk_rows(num_queries, num_gallery, chunk_size, min_chunk)
  by_count = np.argsort(count, kind="stable") if sort_by_count else np.arange(num_queries)
  p = 1 << int(np.max(count) - 1).bit_length()  # static padded width: few distinct compilations
  first = np.empty(num_queries, np.int64)
  ap = np.empty(num_queries, np.float64)
  inp = np.empty(num_queries, np.float64)
  cols = np.arange(p)

  def finish(pending) -> None:
    (ranks, has_nan), rows, nr = pending
    if bool(has_nan):
      raise ValueError(f"similarities contain NaN (chunk with queries {np.sort(rows)[:4].tolist()}...)")
    ranks = np.asarray(ranks)[:len(rows)].astype(np.int64)
    if first_only:
      first[rows] = ranks[:, 0]
      return
    valid = cols[None, :] < nr[:, None]
    r = np.sort(np.where(valid, ranks, num_gallery + 1), axis=1)  # positives' ranks, increasing
    first[rows] = r[:, 0]
    inp[rows] = nr / np.take_along_axis(r, nr[:, None] - 1, axis=1)[:, 0]
    ap[rows] = np.sum(np.where(valid, (cols[None, :] + 1) / r, 0.0), axis=1) / nr

  pending = None
  for k, lo in enumerate(range(0, num_queries, c_rows)):
    rows = by_count[lo:lo + c_rows]
    real = len(rows)
    n = np.zeros(c_rows, np.int32)
    n[:real] = count[rows]
    pos = np.zeros((c_rows, p), np.int32)
    take = np.minimum(start[rows, None] + cols[None, :], len(order) - 1)
    pos[:real] = np.where(cols[None, :] < n[:real, None], order[take], 0)
    padded_rows = np.full(c_rows, -1, np.int64)
    padded_rows[:real] = rows
    launched = launch(padded_rows, pos, n, block, k % 2)  # runs while the previous chunk is finished
    if pending is not None:
      finish(pending)
    pending = (launched, rows, n[:real].astype(np.int64))
  finish(pending)
  out = {"first": first}
  if not first_only:
    out.update(ap=ap, inp=inp)
  return out


def _aligned_empty(shape: tuple[int, ...], dtype=np.float32, align: int = 64) -> np.ndarray:
  """An uninitialised array whose data is `align`-byte aligned (JAX on CPU then uses it without a copy)."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + align, np.uint8)
  offset = (-raw.ctypes.data) % align
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _summarize(per_query: dict[str, np.ndarray], max_rank: int) -> dict[str, float]:
  out = {}
  for k in (1, 5, 10):
    if k <= max_rank:
      out[f"R{k}"] = float(np.mean(per_query["first"] <= k) * 100.0)
  out["mAP"] = float(np.mean(per_query["ap"]) * 100.0)
  out["mINP"] = float(np.mean(per_query["inp"]) * 100.0)
  return out


def _check_max_rank(max_rank: int) -> None:
  if not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
    raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")


def _similarity_runner(similarity, direction: Direction, first_only: bool):
  """Returns (Q, G, launch) for a [num_text, num_image] similarity matrix (see `_per_query`)."""
  if getattr(similarity, "ndim", None) != 2:
    raise ValueError(f"similarity must be a 2-D [Q, G] array, got shape {np.shape(similarity)}")
  sim = _single_device(similarity)
  on_device = isinstance(sim, jax.Array)
  q, g = sim.shape if direction == "t2i" else sim.shape[::-1]
  buffers = {}  # slot -> aligned host buffer (two, used alternately)

  def rows_of(rows: np.ndarray, slot: int):
    real = rows[rows >= 0]
    if on_device:
      if direction == "t2i":
        block = jnp.take(sim, jnp.asarray(real), axis=0)
      else:  # queries are columns; i2t chunks are contiguous column ranges
        block = sim[:, int(real[0]):int(real[-1]) + 1].T
      return jnp.pad(block, ((0, len(rows) - len(real)), (0, 0))).astype(jnp.float32)
    if slot not in buffers:
      buffers[slot] = _aligned_empty((len(rows), g))
    buf = buffers[slot]
    if direction == "t2i" and sim.dtype == np.float32:
      np.take(sim, real, axis=0, out=buf[:len(real)])
    elif direction == "t2i":
      np.copyto(buf[:len(real)], sim[real], casting="unsafe")
    else:
      np.copyto(buf[:len(real)], sim[:, int(real[0]):int(real[-1]) + 1].T, casting="unsafe")
    buf[len(real):] = 0.0
    return jax.device_put(buf)  # aliases the aligned host buffer on CPU (no copy)

  def launch(rows, pos, n, block, slot):
    return _similarity_chunk_ranks(rows_of(rows, slot), pos, n, block_rows=block, first_only=first_only)

  return q, g, launch


def _similarity_per_query(similarity, query_pids, gallery_pids, chunk_size, direction, first_only):
  _check_direction(direction)
  q_pids, g_pids = np.asarray(query_pids), np.asarray(gallery_pids)
  if direction == "i2t":
    q_pids, g_pids = g_pids, q_pids
  q, g, launch = _similarity_runner(similarity, direction, first_only)
  # i2t queries are columns, gathered as contiguous ranges: keep them in index order.
  return _per_query(q, g, q_pids, g_pids, chunk_size, first_only, 1, direction == "t2i", launch)


def _features_per_query(query_feats, gallery_feats, query_pids, gallery_pids, chunk_size, normalize,
                        direction, first_only):
  _check_direction(direction)
  if direction == "i2t":
    query_feats, gallery_feats = gallery_feats, query_feats
    query_pids, gallery_pids = gallery_pids, query_pids
  qf = _single_device(query_feats)
  gallery_feats = _single_device(gallery_feats)
  if qf.ndim != 2 or gallery_feats.ndim != 2 or qf.shape[1] != gallery_feats.shape[1]:
    raise ValueError(f"query_feats and gallery_feats must be [Q, D] and [G, D], got shapes {qf.shape} "
                     f"and {np.shape(gallery_feats)}")
  gallery = _normalize_jit(gallery_feats) if normalize else jnp.asarray(gallery_feats, jnp.float32)
  on_device = isinstance(qf, jax.Array)

  def launch(rows, pos, n, block, slot):
    del slot  # query-feature chunks are small and copied
    idx = np.maximum(rows, 0)  # padded rows repeat query 0 and are ignored (n_pos = 0)
    chunk = jnp.take(qf, jnp.asarray(idx), axis=0) if on_device else np.take(qf, idx, axis=0)
    return _feature_chunk_ranks(chunk, gallery, pos, n, block_rows=block, first_only=first_only,
                                normalize=normalize)

  return _per_query(qf.shape[0], gallery.shape[0], np.asarray(query_pids), np.asarray(gallery_pids),
                    chunk_size, first_only, _MIN_FEATURE_CHUNK, True, launch)


# ----------------------------------------------------------------------------------------------------
# Public API


def retrieval_metrics(similarity, query_pids, gallery_pids, *, max_rank: int = 10,
                      chunk_size: int | None = None, direction: Direction = "t2i") -> dict[str, float]:
  """R@1/5/10, mAP and mINP in percent (python floats) from a similarity matrix.

  similarity: [Q, G] (numpy or jax; ranked in float32) similarity of text query q to gallery image g;
  query_pids: [Q]; gallery_pids: [G]. direction="t2i" ranks the images for each text (rows are
  queries, as IRRA reports); "i2t" ranks the texts for each image (columns are queries: the
  reference's rank(similarity.T, gallery_pids, query_pids)). Keys: "R1", "R5", "R10" (those <=
  max_rank; with fewer than k gallery items R@k = R@G, where the reference would fail), "mAP",
  "mINP". chunk_size: queries per chunk (None: about 16M similarity entries); memory beyond the input
  is about 2 * chunk_size * G * 4 bytes. Ties: see the module docstring (stable, by gallery index).
  Raises ValueError if a query has no positive, on NaN similarities, or on inconsistent shapes.
  """
  _check_max_rank(max_rank)
  per_query = _similarity_per_query(similarity, query_pids, gallery_pids, chunk_size, direction, False)
  return _summarize(per_query, max_rank)


def retrieval_metrics_from_features(query_feats, gallery_feats, query_pids, gallery_pids, *,
                                    max_rank: int = 10, chunk_size: int | None = None,
                                    normalize: bool = True,
                                    direction: Direction = "t2i") -> dict[str, float]:
  """`retrieval_metrics` of query_feats @ gallery_feats.T without materialising the [Q, G] matrix.

  query_feats: [Q, D] text features; gallery_feats: [G, D] image features; pids as in
  `retrieval_metrics`. normalize: L2-normalize both sides first as the reference's evaluator does
  (x / max(||x||, 1e-12)). Similarities are float32 matmuls (precision HIGHEST) computed per chunk of
  chunk_size queries (None: max(512, 16M / G)), so peak memory is about the features plus
  chunk_size * G * 4 bytes (100,000 x 100,000 at D=512 fits in well under 4 GB). direction="i2t"
  uses the images as queries.
  """
  _check_max_rank(max_rank)
  per_query = _features_per_query(query_feats, gallery_feats, query_pids, gallery_pids, chunk_size,
                                  normalize, direction, False)
  return _summarize(per_query, max_rank)


def rank_of_first_hit(similarity, query_pids, gallery_pids, *, chunk_size: int | None = None,
                      direction: Direction = "t2i") -> np.ndarray:
  """1-based rank of each query's first positive, int64 [Q] (R@k = mean(rank <= k)).

  Same arguments and tie rule as `retrieval_metrics`; costs one comparison pass per query (only
  the best positive is ranked), e.g. to pick examples for retrieval pictures.
  """
  return _similarity_per_query(similarity, query_pids, gallery_pids, chunk_size, direction, True)["first"]
