import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import precision_recall_fscore_support

from handprop.metrics import classification_metrics, confusion_matrix, top_confusions


def test_hand_computed_small_case_with_a_class_never_predicted():
    # classes 0, 1, 2; class 2 is never predicted
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 0, 1])
    m = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 1, 0]]
    assert m["accuracy"] == pytest.approx(3 / 6)
    # precision: a 1/2, b 2/4, c 0/0 -> 0;  recall: a 1/2, b 2/2, c 0/2
    assert m["per_class"]["precision"] == pytest.approx([0.5, 0.5, 0.0])
    assert m["per_class"]["recall"] == pytest.approx([0.5, 1.0, 0.0])
    # F1 = 2PR/(P+R): a 0.5, b 2/3, c 0 (0/0 defined as 0)
    assert m["per_class"]["f1"] == pytest.approx([0.5, 2 / 3, 0.0])
    assert m["per_class"]["support"] == [2, 2, 2]
    assert m["averages"]["macro"]["f1"] == pytest.approx((0.5 + 2 / 3) / 3)


def test_matches_scikit_learn(rng):
    y_true = rng.integers(0, 10, size=500)
    y_pred = np.where(rng.uniform(size=500) < 0.7, y_true, rng.integers(0, 9, size=500))
    m = classification_metrics(y_true, y_pred, [str(i) for i in range(10)])
    np.testing.assert_array_equal(
        m["confusion_matrix"], sk_confusion(y_true, y_pred, labels=range(10))
    )
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=range(10), average=average, zero_division=0
        )
        assert m["averages"][average]["precision"] == pytest.approx(p)
        assert m["averages"][average]["recall"] == pytest.approx(r)
        assert m["averages"][average]["f1"] == pytest.approx(f)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(10), zero_division=0)
    np.testing.assert_allclose(m["per_class"]["f1"], f)
    np.testing.assert_array_equal(m["per_class"]["support"], s)


def test_empty_input_gives_defined_values():
    m = classification_metrics(np.array([], int), np.array([], int), ["a", "b"])
    assert m["accuracy"] == 0.0 and m["per_class"]["f1"] == [0.0, 0.0]


def test_top_confusions():
    C = confusion_matrix(np.array([4, 4, 4, 9, 3, 3]), np.array([9, 9, 4, 4, 8, 3]), 10)
    assert top_confusions(C, 2) == [(4, 9, 2), (3, 8, 1)]
    assert top_confusions(C, 10) == [(4, 9, 2), (3, 8, 1), (9, 4, 1)]
    assert all(count > 0 for _, _, count in top_confusions(C, 10))
