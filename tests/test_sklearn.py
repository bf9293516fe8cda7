"""handprop.sklearn: scikit-learn's own estimator checks, and the same parameters as
``handprop train`` for the same data, config and seed."""

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from conftest import DIGITS_CONFIG
from handprop import nn
from handprop.config import parse_toml_config
from handprop.run import train_run
from handprop.run.build import load_split
from handprop.sklearn import HandpropClassifier

#: checks that cannot apply, with the reason (scikit-learn's expected-failed mechanism)
EXPECTED_FAILED: dict[str, str] = {}


def fast(**kw):
    """Settings that keep scikit-learn's checks fast."""
    settings = {
        "hidden_layer_sizes": (8,),
        "epochs": 5,
        "learning_rate": 0.05,
        "batch_size": 32,
        "random_state": 0,
    }
    return HandpropClassifier(**(settings | kw))


@parametrize_with_checks([fast()], expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


DIGITS = DIGITS_CONFIG.replace("epochs = 60\neval_every = 20", "epochs = 12\neval_every = 4")


@pytest.mark.parametrize(
    "extra, kw",
    [
        ("", {}),
        (
            'optimizer = "adam"\nlearning_rate = 0.01\nbatch_size = 64\n',
            {"optimizer": "adam", "learning_rate": 0.01, "batch_size": 64},
        ),
    ],
)
def test_one_fit_gives_the_parameters_of_handprop_train(tmp_path, extra, kw):
    text = DIGITS.replace("learning_rate = 2.0\n", "" if extra else "learning_rate = 2.0\n")
    cfg = parse_toml_config(text + extra + f'out = "{tmp_path}"\n', "digits.toml")
    result = train_run(cfg, default_name="digits", progress=False)
    data = load_split(cfg, progress=False)
    settings = {"learning_rate": 2.0, "optimizer": "gd", "batch_size": None} | kw
    est = HandpropClassifier(
        hidden_layer_sizes=(24,), activation="sigmoid", epochs=12, random_state=3, **settings
    ).fit(data.X_train, data.y_train)
    trained = nn.load(result.run_dir / "model.npz")
    assert est.network_.params.dtype == np.float32
    assert np.array_equal(est.network_.params, trained.params)
    assert est.n_iter_ == 12 and len(est.loss_curve_) == 12


def test_string_labels_and_early_stopping():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    names = np.array(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )
    est = HandpropClassifier(
        (32,),
        epochs=30,
        learning_rate=0.01,
        early_stopping=True,
        n_iter_no_change=3,
        random_state=0,
    ).fit(X / 16, names[y])
    assert set(est.classes_) == set(names)
    assert est.score(X / 16, names[y]) > 0.9
    assert len(est.validation_scores_) == est.n_iter_ and est.best_loss_ is None


def test_sparse_input_is_refused():
    sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(TypeError, match="[Ss]parse"):
        fast().fit(sparse.csr_matrix(np.eye(4)), [0, 1, 0, 1])


def test_non_contiguous_labels_float32_and_pickle():
    import pickle

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5)).astype(np.float32)
    y = np.where(X[:, 0] > 0, 7, -3)
    est = fast().fit(X, y)
    assert est.classes_.tolist() == [-3, 7]
    assert est.predict_proba(X).dtype == np.float32
    assert set(est.predict(X)) <= {-3, 7}
    again = pickle.loads(pickle.dumps(est))
    assert np.array_equal(again.predict_proba(X), est.predict_proba(X))
    # the optimizer's state came along: one more epoch gives the same parameters
    est.partial_fit(X, y)
    again.partial_fit(X, y)
    assert np.array_equal(again.network_.params, est.network_.params)


def test_partial_fit_needs_classes_first_and_knows_them_after():
    X, y = np.eye(4), np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match="classes must be passed"):
        fast().partial_fit(X, y)
    est = fast().partial_fit(X, y, classes=[0, 1, 2, 3])
    assert est.n_iter_ == 1 and est.classes_.tolist() == [0, 1, 2, 3]
    est.partial_fit(X, y)
    assert est.n_iter_ == 2 and len(est.loss_curve_) == 2
    with pytest.raises(ValueError, match="not in classes_"):
        est.partial_fit(X, np.array([0, 1, 5, 0]))


def test_a_cnn_on_images_of_shape_n_h_w():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    images = (X / 16).reshape(-1, 8, 8)[:400]
    est = HandpropClassifier(
        layers=["conv 4 3", "relu", "maxpool 2"], epochs=3, learning_rate=0.01, random_state=0
    ).fit(images, y[:400])
    assert est.network_.input_shape == (1, 8, 8)
    assert est.predict_proba(images[:, None]).shape == (400, 10)
    flat = HandpropClassifier(layers=["conv 4 3", "relu"], image_shape=(8, 8), epochs=1)
    assert flat.fit(X[:50] / 16, y[:50]).network_.input_shape == (1, 8, 8)
    with pytest.raises(ValueError, match="image_shape"):
        HandpropClassifier(layers=["conv 4 3"], epochs=1).fit(X[:50], y[:50])


def test_bad_parameters_are_refused_in_fit_with_handprops_message():
    est = HandpropClassifier(learning_rate=-0.1)  # stored as given
    assert est.learning_rate == -0.1
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0, got -0.1"):
        est.fit(np.eye(3), [0, 1, 1])


def test_pipeline_cross_val_score_grid_search_and_model_files(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    X, y = X[:600], y[:600]
    pipe = make_pipeline(StandardScaler(), fast(epochs=10))
    assert cross_val_score(pipe, X, y, cv=3).mean() > 0.8
    grid = GridSearchCV(
        fast(epochs=10),
        {"learning_rate": [0.01, 0.05], "hidden_layer_sizes": [(8,), (16,)]},
        cv=2,
        n_jobs=2,
    ).fit(X / 16, y)
    assert grid.best_score_ > 0.8
    est = grid.best_estimator_
    nn.save(est.network_, tmp_path / "model.npz")  # handprop's own pickle-free files
    loaded = nn.load(tmp_path / "model.npz")
    assert np.array_equal(loaded.params, est.network_.params)
