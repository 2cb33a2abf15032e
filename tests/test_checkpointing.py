"""Checkpoints: exact round trip with the data iterator, interrupted saves, shape mismatches."""
import logging
import os

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from tipr_jax.training import checkpointing


def _state(scale=1.0):
  return {"params": {"w": jnp.arange(6.0).reshape(2, 3) * scale, "b": jnp.ones(3) * scale},
          "step": jnp.asarray(3, jnp.int32)}


def test_round_trip_and_latest_complete_step(tmp_path):
  ck = checkpointing.TrainCheckpointer(str(tmp_path), save_every_steps=1, keep=3)
  ck.save(1, _state(1.0))
  ck.save(2, _state(2.0))
  assert ck.latest_step() == 2
  restored = ck.restore(jax.tree_util.tree_map(jnp.zeros_like, _state()))
  np.testing.assert_array_equal(restored["params"]["w"], _state(2.0)["params"]["w"])
  # A save killed before it finished: step 2 loses its metadata -> resume from 1, step 2 removed.
  os.remove(tmp_path / "checkpoints" / "2" / "_CHECKPOINT_METADATA")
  ck2 = checkpointing.TrainCheckpointer(str(tmp_path), save_every_steps=1, keep=3)
  assert ck2.latest_step() == 1
  assert not (tmp_path / "checkpoints" / "2").exists()
  restored = ck2.restore(jax.tree_util.tree_map(jnp.zeros_like, _state()))
  np.testing.assert_array_equal(restored["params"]["b"], _state(1.0)["params"]["b"])
  ck2.save(2, _state(5.0))  # the step can be written again
  assert ck2.latest_step() == 2


def test_restore_into_a_model_that_does_not_fit_names_the_parameter(tmp_path):
  ck = checkpointing.TrainCheckpointer(str(tmp_path), save_every_steps=1, keep=1)
  ck.save(1, _state())
  wrong = _state()
  wrong["params"]["w"] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match=r"params/w.*\(2, 3\).*\(3, 3\)"):
    ck.restore(wrong)


def test_load_params_from_a_workdir_checks_shapes(tmp_path, caplog):
  best = checkpointing.BestCheckpointer(str(tmp_path))
  params = _state()["params"]
  best.save(7, params, {"R1": 50.0})
  assert best.best() == (7, {"R1": 50.0})
  with caplog.at_level(logging.WARNING, logger="absl"):
    loaded = checkpointing.load_params(str(tmp_path), jax.eval_shape(lambda: params))
  np.testing.assert_array_equal(loaded["w"], params["w"])
  # No noise about the step-level metadata that lives beside the item (best/7/, not best/7/params).
  assert not [r for r in caplog.records if "metadata" in r.getMessage().lower()], caplog.text
  with pytest.raises(ValueError, match="does not fit"):
    checkpointing.load_params(str(tmp_path), {"w": jax.ShapeDtypeStruct((2, 4), jnp.float32),
                                              "b": jax.ShapeDtypeStruct((3,), jnp.float32)})
  with pytest.raises(FileNotFoundError, match="nowhere"):
    checkpointing.load_params(str(tmp_path / "nowhere"), params)
