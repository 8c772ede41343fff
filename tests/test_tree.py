"""tree.py: nested state round-trips through JSON + tensors exactly, and refuses what needs pickle."""

import math

import numpy as np
import pytest
import torch

from ckptguard.format import tree


def test_optimizer_like_structure_round_trips_with_int_keys_tuples_and_special_floats():
    value = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 1: {}},
        "param_groups": [{"params": [0, 1], "betas": (0.9, 0.999), "lr": 1e-3, "eps": float("inf")}],
        "nan": float("nan"),
        "arr": np.arange(5, dtype=np.uint32),
        "none": None,
    }
    tensors: dict[str, torch.Tensor] = {}
    encoded = tree.encode(value, tensors)
    back = tree.decode(encoded, tensors)
    assert set(back["state"]) == {0, 1}
    assert torch.equal(back["state"][0]["exp_avg"], value["state"][0]["exp_avg"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["param_groups"][0]["eps"] == math.inf and math.isnan(back["nan"])
    assert back["arr"].dtype == np.uint32 and back["arr"].tolist() == [0, 1, 2, 3, 4]
    assert back["none"] is None


def test_unsupported_type_is_refused_with_its_path():
    with pytest.raises(tree.TreeError, match=r"/config/fn has type function.*without pickle"):
        tree.encode({"config": {"fn": lambda: 0}}, {})


def test_tree_pointing_at_missing_tensor_is_an_error_not_a_guess():
    with pytest.raises(tree.TreeError, match="does not hold"):
        tree.decode({"x": {"__tensor__": "nope"}}, {})


def test_colliding_paths_get_distinct_tensor_names():
    tensors: dict[str, torch.Tensor] = {}
    encoded = tree.encode({"a/b": torch.ones(1), "a": {"b": torch.zeros(1)}}, tensors)
    back = tree.decode(encoded, tensors)
    assert back["a/b"].item() == 1.0 and back["a"]["b"].item() == 0.0
