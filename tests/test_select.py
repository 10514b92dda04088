import numpy as np
import pytest

from pipeline.errors import H2TError
from pipeline.select import top_fraction, whole_layers

LAYERS = [{"name": "a", "dim": 4, "offset": 0}, {"name": "b", "dim": 6, "offset": 4}]


def test_global_top_k_spans_layers():
    relevance = np.array([0, 5, 0, 1, 9, 0, 0, 2, 0, 0], float)
    plan = top_fraction(relevance, LAYERS, 0.3)  # k = 3: columns 4, 1, 7
    assert list(plan) == ["a", "b"]
    np.testing.assert_array_equal(plan["a"], [1])
    np.testing.assert_array_equal(plan["b"], [0, 3])


def test_exact_zeros_are_ranked_by_the_tiebreak():
    relevance = np.array([0, 5, 0, 0, 0, 0, 0, 0, 0, 0], float)
    grad = np.array([0.1, 0, 0.2, 0, 0, 0, 0, 0.9, 0, 0])
    plan = top_fraction(relevance, LAYERS, 0.3, tiebreak=grad)  # 1 (non-zero), then 7 and 2 by gradient
    np.testing.assert_array_equal(plan["a"], [1, 2])
    np.testing.assert_array_equal(plan["b"], [3])


def test_layers_without_selection_are_dropped_and_bad_fraction_named():
    plan = top_fraction(np.arange(10, dtype=float), LAYERS, 0.1)
    assert list(plan) == ["b"]
    for bad in (0, 1.5, -0.1):
        with pytest.raises(H2TError, match="select.fraction"):
            top_fraction(np.ones(10), LAYERS, bad)


def test_whole_layers_names_missing_layer():
    np.testing.assert_array_equal(whole_layers(LAYERS, ["b"])["b"], np.arange(6))
    with pytest.raises(H2TError, match="'pre_logits'"):
        whole_layers(LAYERS, ["pre_logits"])
