r"""Builds a dataset's ArrayRecord files from its original layout.

  python -m tipr_jax.data.prepare --dataset=cuhk_pedes --manual_dir=/data/raw --data_dir=/data/tfds
      [--skip_bad] [--overwrite] [--max_side=N]
  python -m tipr_jax.data.prepare --dataset=synthetic --data_dir=/data/tfds [--synthetic_identities=64]

The build runs in a temporary directory inside --data_dir and is moved to
<data_dir>/<dataset>/<version>/ only when complete, so a failed build leaves nothing that
`tfds.data_source` could load. A JSON report (`prepare_report.json`: skipped entries with the
reason, dropped empty captions, counts) is written beside the records.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import tensorflow_datasets as tfds
from absl import app
from absl import flags

from tipr_jax.data import builders

REPORT_NAME = 'prepare_report.json'


def output_dir(dataset: str, data_dir: str | os.PathLike) -> pathlib.Path:
  """Where `prepare` puts the dataset: <data_dir>/<dataset>/<version>."""
  return pathlib.Path(data_dir) / dataset / builders.DATASET_VERSION


def _remove_stale_builds(data_dir: pathlib.Path, dataset: str) -> None:
  """Deletes temporary build directories a killed `prepare` of `dataset` left behind."""
  if data_dir.is_dir():
    for stale in data_dir.glob(f'.prepare-{dataset}-*'):
      if stale.is_dir():
        shutil.rmtree(stale, ignore_errors=True)


def prepare(dataset: str, *, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None,
            skip_bad: bool = False, overwrite: bool = False, max_side: int | None = None,
            check_threads: int = 4, progress: bool = True, synthetic_identities: int = 64,
            synthetic_seed: int = 0) -> pathlib.Path:
  """Builds `dataset` into <data_dir>/<dataset>/<version> and returns that directory.

  Raises `builders.BadInputsError` (a ValueError) listing the first bad inputs unless `skip_bad`,
  ValueError / FileNotFoundError for unusable annotations; in every failure nothing is left behind.
  """
  if dataset not in builders.BUILDERS:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {sorted(builders.BUILDERS)}')
  cls = builders.BUILDERS[dataset]
  if manual_dir is None and cls is not builders.Synthetic:
    raise ValueError(f'--manual_dir is required for {dataset}: {cls.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  if manual_dir is not None and not pathlib.Path(manual_dir).is_dir():
    raise FileNotFoundError(f'manual_dir {manual_dir} is not a directory')
  if cls is builders.Synthetic and manual_dir is not None:
    ann = cls.LAYOUT.annotation_path(manual_dir)
    if not ann.is_file():
      raise FileNotFoundError(
          f'{ann} not found: --dataset=synthetic reads a CUHK-PEDES layout (tipr_jax.data.synthetic '
          '--layout=cuhk). Prepare an icfg or rstp layout with --dataset=icfg_pedes or '
          '--dataset=rstpreid, or omit --manual_dir to generate the data.')
  _remove_stale_builds(pathlib.Path(data_dir), dataset)
  final = output_dir(dataset, data_dir)
  if final.exists():
    if not overwrite:
      raise FileExistsError(f'{final} already exists; pass --overwrite to rebuild it')
  data_dir = pathlib.Path(data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  kwargs = {}
  if cls is builders.Synthetic:
    kwargs = dict(identities=synthetic_identities, seed=synthetic_seed)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.prepare-{dataset}-', dir=data_dir))
  try:
    builder = cls(data_dir=os.fspath(tmp / 'data'), skip_bad=skip_bad, max_side=max_side,
                  check_threads=check_threads, progress=progress, **kwargs)
    builder.download_and_prepare(
        download_dir=os.fspath(tmp / 'downloads'),
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir) if manual_dir is not None else None))
    built = tmp / 'data' / dataset / builders.DATASET_VERSION
    if not (built / 'dataset_info.json').is_file():
      raise RuntimeError(f'TFDS finished but {built} holds no dataset_info.json')
    if isinstance(builder, builders.Synthetic):
      builder.report['side_files'] = builder.copy_side_files(built)
    (built / REPORT_NAME).write_text(json.dumps(builder.report, indent=2))
    if final.exists():
      shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(built, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


_DATASET = flags.DEFINE_enum('dataset', None, sorted(builders.BUILDERS), 'Dataset to build.')
_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None, 'Root holding <DATASET>/<annotation json> and <DATASET>/imgs/ (optional '
    'for synthetic: generated when absent).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Output TFDS data dir.')
_SKIP_BAD = flags.DEFINE_bool('skip_bad', False, 'Leave out malformed entries and entries whose '
                              'image is missing or does not decode (listed in '
                              'prepare_report.json) instead of failing.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing build.')
_MAX_SIDE = flags.DEFINE_integer('max_side', None, 'Optional: re-encode images whose longer side '
                                 'exceeds this (JPEG q=95). Default: keep the original bytes.')
_THREADS = flags.DEFINE_integer('check_threads', 4, 'Threads for the image check.')
_SYN_IDS = flags.DEFINE_integer('synthetic_identities', 64, 'synthetic only: identities.')
_SYN_SEED = flags.DEFINE_integer('synthetic_seed', 0, 'synthetic only: seed.')


def main(argv):
  del argv
  if not _DATA_DIR.value or not _DATASET.value:
    raise app.UsageError('--dataset and --data_dir are required')
  try:
    out = prepare(_DATASET.value, data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value,
                  skip_bad=_SKIP_BAD.value, overwrite=_OVERWRITE.value, max_side=_MAX_SIDE.value,
                  check_threads=_THREADS.value, synthetic_identities=_SYN_IDS.value,
                  synthetic_seed=_SYN_SEED.value)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    raise SystemExit(f'prepare failed: {e}') from None
  report = json.loads((out / REPORT_NAME).read_text())
  print(f'wrote {out}')
  print(json.dumps({k: v for k, v in report.items() if k != 'skipped'}, indent=2))


if __name__ == '__main__':
  app.run(main)
