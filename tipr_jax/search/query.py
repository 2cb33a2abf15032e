"""Text queries against an index: encode the sentences, exact top-k, identities and hits."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from tipr_jax.search import topk
from tipr_jax.search.index import Index, check_model


@dataclasses.dataclass(frozen=True)
class Match:
  rank: int            # 1-based
  index: int           # gallery position
  file: str
  score: float         # cosine similarity, float32
  identity: Any        # the image's identity, or None when unknown
  hit: bool | None     # same identity as the query (None when either is unknown)


@dataclasses.dataclass(frozen=True)
class QueryResult:
  query: str
  identity: Any                # the query's identity, or None
  identity_source: str | None  # 'given' | 'caption' (an indexed dataset caption) | None
  relevant: int | None         # gallery images of that identity
  matches: list[Match]
  truncated: bool = False      # longer than the model's context: only its start was read

  def to_json(self) -> dict:
    return {"query": self.query, "identity": self.identity, "identity_source": self.identity_source,
            "relevant_in_gallery": self.relevant, "truncated": self.truncated,
            "results": [dataclasses.asdict(m) for m in self.matches]}


class Searcher:
  """An index on the devices plus the model that wrote it (checked by fingerprint)."""

  def __init__(self, index: Index, model, *,
               memory_budget_bytes: int = topk.DEFAULT_MEMORY_BUDGET):
    check_model(index, model)
    self.index = index
    self.model = model
    self.memory_budget_bytes = memory_budget_bytes
    self.gallery = topk.make_gallery(index.rows(), model.mesh)
    ids = index.identities
    self._ids = None if ids is None else np.asarray([str(i) if i is not None else "" for i in ids])
    # A given identity ("46" on the command line) takes the index's own value and type (46).
    self._identity_by_text = {} if ids is None else {str(i): i for i in ids if i is not None}

  def search(self, queries: Sequence[str], k: int = 10,
             identities: Sequence[Any] | None = None) -> list[QueryResult]:
    """The top k images of each query, best first.

    identities: the identity of each query (None entries: unknown); by default a query that equals
    a caption of the indexed dataset split takes that caption's identity.
    """
    queries = list(queries)
    if not queries:
      raise ValueError("no query given")
    if identities is not None and len(identities) != len(queries):
      raise ValueError(f"{len(identities)} identities for {len(queries)} queries")
    feats = self.model.encode_queries(queries)
    scores, indices = topk.top_k(feats, self.gallery, k,
                                 memory_budget_bytes=self.memory_budget_bytes)
    out = []
    for qi, text in enumerate(queries):
      ident, source = (identities[qi], "given") if identities is not None else (None, None)
      if ident is not None:
        ident = self._identity_by_text.get(str(ident), ident)
      if ident is None:
        ident = self.index.identity_of_caption(text)
        source = "caption" if ident is not None else None
      relevant = None
      if ident is not None and self._ids is not None:
        relevant = int(np.sum(self._ids == str(ident)))
      matches = []
      for r, (s, gi) in enumerate(zip(scores[qi], indices[qi])):
        g_ident = None if self.index.identities is None else self.index.identities[gi]
        hit = None if ident is None or g_ident is None else str(g_ident) == str(ident)
        matches.append(Match(rank=r + 1, index=int(gi), file=self.index.names[gi], score=float(s),
                             identity=g_ident, hit=hit))
      truncated = len(self.model.tokenizer.encode(text)) + 2 > self.model.context_length
      out.append(QueryResult(query=text, identity=ident, identity_source=source,
                             relevant=relevant, matches=matches, truncated=truncated))
    return out
