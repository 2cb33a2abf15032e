"""Text search over a gallery with a trained model (`python -m tipr_jax.search index|query`).

  model.py  the model of a training workdir: encoders, tokenizer, fingerprint
  index.py  build (folder or prepared dataset), write atomically, load an embedding index
  topk.py   exact top-k over a float16 gallery, chunked within a memory budget, sharded over devices
  query.py  Searcher: sentences -> ranked files with scores and hits
  grid.py   the results picture
"""
