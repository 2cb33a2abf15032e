r"""Text search over a gallery of person images with a trained model.

  python -m tipr_jax.search index --checkpoint=runs/synthetic --images=FOLDER_OR_PREPARED --out=IDX
  python -m tipr_jax.search query --index=IDX "a man in a red jacket with a black backpack" \
      [--top_k=10] [--out=grid.png] [--json] [--queries_file=FILE] [--identity=ID]

`index` embeds every image of a folder (recursively; unreadable files are skipped and listed) or
the test split of a prepared dataset, and writes the index atomically. `query` encodes the
sentences with the model that wrote the index (refusing any other: fingerprints must agree),
prints the top-k files with scores (or JSON with --json) and draws the results picture (--out).
A queries file holds one query per line; blank lines and lines starting with '#' are ignored, and
'ID<TAB>sentence' gives the query's identity. Exit status: 0 on success, 1 on an error (its
message on stderr), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m tipr_jax.search", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  sub = p.add_subparsers(dest="command", required=True)

  ix = sub.add_parser("index", help="embed a gallery and write an index")
  ix.add_argument("--checkpoint", required=True,
                  help="training workdir (its best, else latest, checkpoint) or checkpoint dir")
  ix.add_argument("--images", required=True,
                  help="folder of person images, or a prepared dataset (data_dir, its <dataset> "
                       "dir or the version dir)")
  ix.add_argument("--out", required=True, help="index directory to write (replaced if an index)")
  ix.add_argument("--split", default="test", choices=("test", "val"),
                  help="split of a prepared dataset (default test)")
  ix.add_argument("--identity", default="none", choices=("none", "dir"),
                  help="folder galleries: 'dir' takes each image's parent directory as its identity")
  ix.add_argument("--batch_size", type=int, default=None,
                  help="images per batch (default: the training config's eval_batch_size)")
  ix.add_argument("--tokenizer", default=None,
                  help="tokenizer path if the training config's one is not on this machine")
  ix.add_argument("--no_progress", action="store_true", help="no progress bar")

  q = sub.add_parser("query", help="search an index with sentences")
  q.add_argument("queries", nargs="*", help="query sentences")
  q.add_argument("--index", required=True, help="index directory")
  q.add_argument("--queries_file", default=None, help="text file, one query per line")
  q.add_argument("--top_k", type=int, default=10, help="results per query (default 10)")
  q.add_argument("--out", default=None, help="write the results picture (PNG) here")
  q.add_argument("--json", action="store_true", help="print JSON instead of text")
  q.add_argument("--identity", action="append", default=None,
                 help="identity of each command-line query (repeat once per query)")
  q.add_argument("--checkpoint", default=None,
                 help="model to encode queries with (default: the one that wrote the index)")
  q.add_argument("--tokenizer", default=None,
                 help="tokenizer path if the training config's one is not on this machine")
  q.add_argument("--memory_budget_mb", type=float, default=64.0,
                 help="largest score block held at once, MiB (default 64)")
  q.add_argument("--thumb_height", type=int, default=192, help="picture: image height in pixels")
  return p


def read_queries_file(path: str) -> tuple[list[str], list]:
  """(queries, identities) of a queries file; identities are None where not given."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"queries file {path} does not exist")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  queries, identities = [], []
  for n, line in enumerate(lines, 1):
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    ident = None
    if "\t" in line:
      ident, line = line.split("\t", 1)
      ident = ident.strip() or None
    if not line.strip():
      raise ValueError(f"{path} line {n}: empty query after the identity {ident!r}")
    queries.append(line.strip())
    identities.append(ident)
  if not queries:
    raise ValueError(f"queries file {path} holds no query (blank and '#' lines are skipped)")
  return queries, identities


def _run_index(args) -> int:
  from tipr_jax.search import index as index_lib, model as model_lib
  model = model_lib.load_model(args.checkpoint, tokenizer=args.tokenizer)
  report = index_lib.build_index(model, args.images, args.out, split=args.split,
                                 identity=args.identity, batch_size=args.batch_size,
                                 progress=not args.no_progress)
  if report.skipped:
    print(f"skipped {len(report.skipped)} unreadable image(s):")
    for s in report.skipped:
      print(f"  {s['file']}: {s['reason']}")
  print(f"indexed {report.count} images into {report.path} in {report.seconds:.1f} s "
        f"(model fingerprint {model.fingerprint[:16]}, checkpoint {model.checkpoint})")
  return 0


def _gather_queries(args, parser) -> tuple[list[str], list | None]:
  queries = list(args.queries)
  identities = None
  if args.identity is not None:
    if len(args.identity) != len(queries):
      parser.error(f"--identity was given {len(args.identity)} time(s) for {len(queries)} "
                   f"command-line queries; give it once per query")
    identities = list(args.identity)
  if args.queries_file:
    fq, fi = read_queries_file(args.queries_file)
    identities = (identities or [None] * len(queries)) + fi
    queries += fq
  if not queries:
    parser.error("give at least one query sentence or --queries_file")
  for i, text in enumerate(queries):  # fail before the model loads
    if not text.strip():
      raise ValueError(f"query {i + 1} is empty: give a description such as "
                       f"'a woman in a red coat with a black bag'")
  if identities is not None and all(i is None for i in identities):
    identities = None
  return queries, identities


def _print_text(results, index) -> None:
  for qi, r in enumerate(results):
    ident = ""
    if r.identity is not None:
      how = " (from the dataset caption)" if r.identity_source == "caption" else ""
      rel = f"; {r.relevant} image(s) of it in the gallery" if r.relevant is not None else ""
      ident = f"  [identity {r.identity}{how}{rel}]"
    print(f"query {qi + 1}: {r.query!r}{ident}")
    width = max(len(m.file) for m in r.matches)
    for m in r.matches:
      extra = "" if m.identity is None else f"  id {m.identity}"
      mark = "" if m.hit is None else ("  hit" if m.hit else "  miss")
      print(f"  {m.rank:3d}  {m.score:8.4f}  {m.file:<{width}}{extra}{mark}")
  del index


def _run_query(args, parser) -> int:
  queries, identities = _gather_queries(args, parser)
  if args.top_k < 1:
    parser.error(f"--top_k must be at least 1, got {args.top_k}")
  from tipr_jax.search import index as index_lib, model as model_lib, query as query_lib
  index = index_lib.load_index(args.index)
  checkpoint = args.checkpoint or index.meta["checkpoint"]
  if not args.checkpoint and not os.path.exists(checkpoint):
    raise FileNotFoundError(f"the checkpoint that wrote index {index.path}, {checkpoint}, no longer "
                            f"exists; pass --checkpoint=DIR (its fingerprint must be "
                            f"{index.fingerprint[:16]})")
  model = model_lib.load_model(checkpoint, tokenizer=args.tokenizer)
  searcher = query_lib.Searcher(index, model,
                                memory_budget_bytes=int(args.memory_budget_mb * (1 << 20)))
  results = searcher.search(queries, args.top_k, identities)
  if args.json:
    print(json.dumps({"index": index.path, "fingerprint": index.fingerprint,
                      "checkpoint": model.checkpoint,
                      "queries": [r.to_json() for r in results]}, indent=2))
  else:
    _print_text(results, index)
  if args.out:
    from tipr_jax.search import grid  # pylint: disable=g-import-not-at-top
    h = args.thumb_height
    grid.draw_grid(results, index.image, args.out, thumb=(max(1, h // 2), h))
    print(f"wrote {args.out}", file=sys.stderr if args.json else sys.stdout)
  return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
  del category, filename, lineno, file, line
  print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax INFO/WARNING chatter
  with warnings.catch_warnings():
    warnings.showwarning = _show_warning
    try:
      status = _run_index(args) if args.command == "index" else _run_query(args, parser)
      sys.stdout.flush()  # a closed pipe shows here, inside the handler below
      return status
    except _ERRORS as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    except BrokenPipeError:  # e.g. `... | head`: the reader left; stop quietly, like other tools
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail too
      return 141


def _use_every_cpu_core() -> None:
  """On CPU, one JAX device per core (at most 8), so the search is sharded over all of them."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", max(1, min(8, os.cpu_count() or 1)))


if __name__ == "__main__":
  _use_every_cpu_core()
  sys.exit(main())
