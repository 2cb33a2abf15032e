"""Exact top-k inner-product search over a float16 gallery, chunked and sharded over devices.

The gallery [G, D] is stored as float16, its rows split over the devices of a 1-D mesh (each device
holds `rows_per_device` rows; the padding rows at the end never enter a result). For a block of
queries [Qb, D] (float32), every device walks its rows in chunks of C: it computes the chunk's
scores in float32 (the float16 rows are converted exactly and multiplied in float32), keeps the
chunk's best k with `lax.top_k` (no sort of the chunk) and merges them into its running best k.
The devices' k-lists are then merged into the global top k. No [Q, G] matrix ever exists: the
largest score block is Qb x C per device, with Qb and C chosen so that all devices together stay
within `memory_budget_bytes` (scores plus the chunk converted to float32).

Ties are broken by gallery index (the lower index ranks first), the rule of
`tipr_jax.eval.retrieval_metrics`: `lax.top_k` keeps the lower index first on equal values, every
merge puts the earlier rows first, and the devices hold consecutive row ranges.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tipr_jax.training import sharding

DEFAULT_MEMORY_BUDGET = 64 << 20  # bytes of float32 score blocks (+ converted chunk) at once
_MAX_UNIT = 8192                  # rows per device are padded to a multiple of this (or smaller pow2)
_MIN_CHUNK = 256                  # gallery rows per chunk are at least this (or the whole shard)
_MAX_QUERY_BLOCK = 256            # queries per block: larger blocks only shrink the chunks
# Few queries: the pass is memory-bound and the converted float32 chunk should stay in cache
# (measured at 1M x 512, one query: 2,048-row chunks ~1.4x less CPU than 8,192).
_FEW_QUERIES = 32
_FEW_QUERIES_CHUNK_BYTES = 4 << 20


def _pow2_floor(n: int) -> int:
  return 1 << (max(int(n), 1).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
  return 1 << (max(int(n), 1) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Gallery:
  """float16 embeddings on the mesh: `array` [num_devices * rows_per_device, D], rows sharded."""
  array: jax.Array
  size: int             # G real rows (the rest is zero padding)
  rows_per_device: int  # a multiple of `unit`
  unit: int             # a power of two: every chunk size C divides rows_per_device
  mesh: Mesh

  @property
  def dim(self) -> int:
    return int(self.array.shape[1])

  @property
  def nbytes(self) -> int:
    """Bytes held on the devices (padding included)."""
    return int(self.array.size) * self.array.dtype.itemsize


def _aligned_zeros(shape: tuple[int, int], dtype, align: int = 64) -> np.ndarray:
  """Zeros whose data pointer is `align`-byte aligned (then a CPU device can use it without a copy)."""
  n = int(np.prod(shape)) * np.dtype(dtype).itemsize
  buf = np.zeros(n + align, np.uint8)
  off = (-buf.ctypes.data) % align
  return buf[off:off + n].view(dtype).reshape(shape)


def make_gallery(embeddings: Any, mesh: Mesh | None = None) -> Gallery:
  """Puts embeddings [G, D] on the devices of `mesh` as float16, rows sharded (zero padded).

  embeddings: an array (numpy, memmap), or an object with `shape` and `read_rows(start, out)` that
  fills `out` [n, D] float16 with rows start..start+n (index.NpyRows reads them from the file, so
  nothing is memory-mapped). Each device's rows are written into one aligned host buffer that the
  CPU backend adopts without copying: loading adds about one gallery's bytes to the process.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  shape = tuple(getattr(embeddings, "shape", ()))
  if len(shape) != 2 or shape[0] == 0:
    raise ValueError(f"gallery embeddings must be a non-empty [G, D] array, got shape {shape}")
  g, d = (int(s) for s in shape)
  n_dev = mesh.devices.size
  per_dev = -(-g // n_dev)
  # Chunks are powers of two up to `unit`; padding is below 1/8 of the rows (or a few rows).
  unit = min(_MAX_UNIT, max(_pow2_floor(per_dev // 8), min(_pow2_ceil(per_dev), _MIN_CHUNK)))
  rows = -(-per_dev // unit) * unit
  global_shape = (n_dev * rows, d)
  spec = NamedSharding(mesh, P(sharding.DATA_AXIS))
  read_rows = getattr(embeddings, "read_rows", None)
  arrays = []
  for device, index in spec.addressable_devices_indices_map(global_shape).items():
    lo = index[0].start or 0
    buf = _aligned_zeros((rows, d), np.float16)
    stop = min(lo + rows, g)
    if stop > lo:
      if read_rows is not None:
        read_rows(lo, buf[:stop - lo])
      else:
        buf[:stop - lo] = embeddings[lo:stop]
    arrays.append(jax.device_put(buf, device))
    del buf
  array = jax.make_array_from_single_device_arrays(global_shape, spec, arrays)
  return Gallery(array=array, size=g, rows_per_device=rows, unit=unit, mesh=mesh)


def _chunk_bytes(qb: int, c: int, d: int, k: int) -> int:
  """Per-device working memory of one chunk step: float32 scores [qb, c], the chunk converted to
  float32 [c, d], its row ids, and the top-k / merge buffers (values and indices)."""
  return 4 * c * (qb + d + 1) + 64 * qb * k


def plan(num_queries: int, gallery: Gallery, memory_budget_bytes: int, k: int = 10
         ) -> tuple[int, int]:
  """(query rows per block Qb, gallery rows per chunk C) within the memory budget.

  num_devices * _chunk_bytes(Qb, C, D, k) <= memory_budget_bytes. Qb is a power of two (few
  compilations) <= _MAX_QUERY_BLOCK; C is a power of two dividing rows_per_device, at least
  min(_MIN_CHUNK, unit), and for fewer than _FEW_QUERIES queries its float32 copy stays within
  _FEW_QUERIES_CHUNK_BYTES (cache-sized). Raises ValueError if even one query cannot fit.
  """
  n_dev = gallery.mesh.devices.size
  d = gallery.dim
  min_c = min(_MIN_CHUNK, gallery.unit)
  per_dev = memory_budget_bytes // n_dev
  if _chunk_bytes(1, min_c, d, k) > per_dev:
    need = n_dev * _chunk_bytes(1, min_c, d, k)
    raise ValueError(f"memory_budget_bytes={memory_budget_bytes} is too small: one query against a "
                     f"chunk of {min_c} rows on {n_dev} devices needs {need} bytes")
  qb = min(_pow2_ceil(num_queries), _MAX_QUERY_BLOCK)
  while qb > 1 and _chunk_bytes(qb, min_c, d, k) > per_dev:
    qb //= 2
  c = min_c
  max_c = gallery.unit
  if qb < _FEW_QUERIES:
    max_c = min(max_c, max(min_c, _pow2_floor(_FEW_QUERIES_CHUNK_BYTES // (4 * d))))
  while 2 * c <= max_c and _chunk_bytes(qb, 2 * c, d, k) <= per_dev:
    c *= 2
  return qb, c


@functools.lru_cache(maxsize=64)
def _searcher(mesh: Mesh, rows: int, chunk: int, k: int):
  """jit(queries [Qb, D] f32, gallery [n*rows, D] f16, size) -> (scores [Qb, k], indices [Qb, k])."""
  kc = min(k, chunk)
  n_dev = mesh.devices.size

  def local(q, g, size):
    base = lax.axis_index(sharding.DATA_AXIS) * rows
    chunks = g.reshape(rows // chunk, chunk, g.shape[1])
    offsets = jnp.arange(rows // chunk, dtype=jnp.int32) * chunk

    def step(carry, xs):
      best_s, best_i = carry
      rows_f16, off = xs
      s = lax.dot_general(q, rows_f16.astype(jnp.float32), (((1,), (1,)), ((), ())),
                          precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
      idx = base + off + jnp.arange(chunk, dtype=jnp.int32)
      s = jnp.where(idx[None, :] < size, s, -jnp.inf)
      cs, ci = lax.top_k(s, kc)
      ms, mpos = lax.top_k(jnp.concatenate([best_s, cs], axis=1), k)  # earlier rows first: ties
      mi = jnp.take_along_axis(jnp.concatenate([best_i, idx[ci]], axis=1), mpos, axis=1)
      return (ms, mi), None

    init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
            jnp.full((q.shape[0], k), -1, jnp.int32))
    (s, i), _ = lax.scan(step, init, (chunks, offsets))
    return s[None], i[None]

  spec = P(sharding.DATA_AXIS)
  per_device = jax.shard_map(local, mesh=mesh, in_specs=(P(), spec, P()), out_specs=(spec, spec),
                             check_vma=False)

  @jax.jit
  def search(q, g, size):
    s, i = per_device(q, g, size)                      # [n_dev, Qb, k], devices in row order
    s = jnp.transpose(s, (1, 0, 2)).reshape(q.shape[0], n_dev * k)
    i = jnp.transpose(i, (1, 0, 2)).reshape(q.shape[0], n_dev * k)
    top_s, pos = lax.top_k(s, k)
    return top_s, jnp.take_along_axis(i, pos, axis=1)

  return search


def top_k(queries: Any, gallery: Gallery, k: int, *,
          memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> tuple[np.ndarray, np.ndarray]:
  """The k best gallery rows of each query by inner product, best first.

  queries: [Q, D] float (normalize them first for cosine scores). Returns (scores float32 [Q, k'],
  indices int64 [Q, k']) with k' = min(k, G); scores are float32 dot products with the float16 rows.
  Ties: lower gallery index first. Raises ValueError on bad shapes, k < 1 or non-finite queries.
  """
  q = np.asarray(queries, np.float32)
  if q.ndim != 2 or q.shape[1] != gallery.dim:
    raise ValueError(f"queries must be [Q, {gallery.dim}], got shape {q.shape}")
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}")
  if not np.all(np.isfinite(q)):
    bad = int(np.flatnonzero(~np.all(np.isfinite(q), axis=1))[0])
    raise ValueError(f"query {bad} has non-finite values")
  k = min(int(k), gallery.size)
  n = q.shape[0]
  if n == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
  qb, c = plan(n, gallery, memory_budget_bytes, k)
  fn = _searcher(gallery.mesh, gallery.rows_per_device, c, k)
  size = jnp.int32(gallery.size)
  scores, indices = [], []
  for lo in range(0, n, qb):
    block = q[lo:lo + qb]
    real = len(block)
    if real < qb:
      block = np.concatenate([block, np.zeros((qb - real, q.shape[1]), np.float32)])
    s, i = fn(jax.device_put(block, sharding.replicated(gallery.mesh)), gallery.array, size)
    scores.append(np.asarray(s)[:real])
    indices.append(np.asarray(i)[:real].astype(np.int64))
  return np.concatenate(scores), np.concatenate(indices)
