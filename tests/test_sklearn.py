"""handprop.sklearn: scikit-learn's own estimator checks, the same parameters as
``handprop train`` for the same data, config and seed, warm starts, threads under
joblib, and scikit-learn's tools on both estimators."""

import pickle

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.utils.estimator_checks import parametrize_with_checks

from conftest import DIGITS_CONFIG
from handprop import nn
from handprop.config import parse_toml_config
from handprop.run import train_run
from handprop.run.build import load_split
from handprop.sklearn import HandpropClassifier, HandpropRegressor, blas_threads

#: checks that cannot apply, with the reason (scikit-learn's expected-failed mechanism)
EXPECTED_FAILED: dict[str, str] = {}


def fast(cls=HandpropClassifier, **kw):
    """Settings that keep scikit-learn's checks fast."""
    settings = {
        "hidden_layer_sizes": (8,),
        "epochs": 5,
        "learning_rate": 0.05,
        "batch_size": 32,
        "random_state": 0,
    }
    return cls(**(settings | kw))


@parametrize_with_checks(
    [fast(), fast(HandpropRegressor)], expected_failed_checks=lambda est: EXPECTED_FAILED
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def digits(n=400, images=False):
    """The first ``n`` 8x8 digits, scaled to [0, 1]: X (n, 64) or (n, 8, 8), labels."""
    X, y = load_digits(return_X_y=True)
    X = (X[:n] / 16).astype(np.float32)
    return (X.reshape(-1, 8, 8) if images else X), y[:n]


DIGITS = DIGITS_CONFIG.replace("epochs = 60\neval_every = 20", "epochs = 12\neval_every = 4")


ADAM = 'optimizer = "adam"\nlearning_rate = 0.01\nbatch_size = 64\n'
AUGMENT = {  # every kind at once: shifts, rotations, changes of size, elastic distortions
    "augment_shift": 1,
    "augment_rotate": 15.0,
    "augment_scale": 0.1,
    "augment_elastic_alpha": 2.0,
    "augment_elastic_sigma": 2.0,
}


@pytest.mark.parametrize(
    "extra, kw",
    [
        ("", {}),
        (ADAM, {"optimizer": "adam", "learning_rate": 0.01, "batch_size": 64}),
        (  # an MLP on the flat 8x8 images, each mini-batch augmented as the CLI does
            ADAM + "".join(f"{k} = {v}\n" for k, v in AUGMENT.items()),
            {"optimizer": "adam", "learning_rate": 0.01, "batch_size": 64, "image_shape": (8, 8)}
            | AUGMENT,
        ),
    ],
)
def test_one_fit_gives_the_parameters_of_handprop_train(tmp_path, extra, kw):
    text = DIGITS.replace("learning_rate = 2.0\n", "" if extra else "learning_rate = 2.0\n")
    cfg = parse_toml_config(text + extra + f'out = "{tmp_path}"\n', "digits.toml")
    result = train_run(cfg, default_name="digits", progress=False)
    data = load_split(cfg, progress=False)
    settings = {"learning_rate": 2.0, "optimizer": "gd", "batch_size": None, "init": cfg.init} | kw
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


# -- the regressor ----------------------------------------------------------------------


def test_a_linear_regressor_finds_the_least_squares_solution():
    """No hidden layer, full-batch gradient descent on squared error: least squares."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 5))
    Y = X @ rng.normal(size=(5, 2)) + [1.0, -2.0] + 0.1 * rng.normal(size=(100, 2))
    est = HandpropRegressor(
        (), optimizer="gd", learning_rate=0.5, batch_size=None, epochs=300, random_state=0
    ).fit(X, Y)
    dense = est.network_.layers[0]
    coef = np.linalg.lstsq(np.c_[X, np.ones(len(X))], Y, rcond=None)[0]
    np.testing.assert_allclose(np.r_[dense.W, dense.b[None]], coef, atol=1e-8)
    assert est.predict(X).shape == (100, 2) and est.predict(X).dtype == np.float64
    assert est.score(X, Y) > 0.9


def test_the_regressor_predicts_in_the_shape_of_y():
    X, y = digits(200)
    target = y.astype(float)
    one = fast(HandpropRegressor, epochs=2).fit(X, target)
    assert one.n_outputs_ == 1 and one.predict(X).shape == (200,)
    column = fast(HandpropRegressor, epochs=2).fit(X, target[:, None])
    assert column.predict(X).shape == (200, 1)
    assert np.array_equal(column.predict(X)[:, 0], one.predict(X))  # the same training
    two = fast(HandpropRegressor, epochs=2).fit(X, np.c_[target, -target])
    assert two.predict(X).shape == (200, 2) and two.predict(X).dtype == np.float32
    with pytest.raises(ValueError, match="y has 1 targets per row, the fitted network 2"):
        two.partial_fit(X, target)


def test_squared_error_takes_real_targets():
    from handprop.nn import numeric_gradient, relative_error
    from handprop.nn.losses import SquaredError

    rng = np.random.default_rng(0)
    Z, Y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    loss, G = SquaredError()(Z, Y)
    assert loss == pytest.approx(0.5 * np.sum((Z - Y) ** 2) / 6)
    numeric = numeric_gradient(lambda: SquaredError().value(Z, Y), Z)
    assert relative_error(G, numeric) < 1e-6


# -- warm start -------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [HandpropClassifier, HandpropRegressor])
def test_two_warm_fits_of_k_epochs_give_one_fit_of_2k(cls):
    """The epoch count goes on (epoch e draws from the generator of (seed, e)), and so
    do the optimizer's moments and step count, through a pickle too."""
    X, y = digits(300)
    kw = {"hidden_layer_sizes": (16,), "dropout": 0.1, "batch_size": 64, "learning_rate": 0.01}
    once = cls(epochs=6, random_state=0, **kw).fit(X, y)
    warm = cls(epochs=3, warm_start=True, random_state=0, **kw).fit(X, y)
    warm = pickle.loads(pickle.dumps(warm)).fit(X, y)
    assert warm.n_iter_ == 6 and warm.loss_curve_ == once.loss_curve_
    assert np.array_equal(warm.network_.params, once.network_.params)


def test_warm_start_starts_anew_when_the_network_would_differ():
    X, y = digits(300)
    est = fast(epochs=2, warm_start=True).fit(X, y)
    est.set_params(learning_rate=0.01).fit(X, y)  # another rate: the same network
    assert est.n_iter_ == 4 and len(est.loss_curve_) == 4
    est.fit(X[y < 5], y[y < 5])  # other classes
    assert est.n_iter_ == 2 and est.classes_.tolist() == [0, 1, 2, 3, 4]
    est.set_params(hidden_layer_sizes=(4,)).fit(X[y < 5], y[y < 5])  # another network
    assert est.n_iter_ == 2 and est.network_.layers[0].W.shape == (64, 4)
    est.fit(X[y < 5].astype(np.float64), y[y < 5])  # another dtype
    assert est.n_iter_ == 2
    cold = fast(epochs=2).fit(X, y).fit(X, y)
    assert cold.n_iter_ == 2


# -- augmentation -----------------------------------------------------------------------


def test_augmentation_needs_images_and_mini_batches():
    X, y = digits(100)
    images, _ = digits(100, images=True)
    with pytest.raises(ValueError, match="augmentation needs images"):
        fast(augment_shift=1).fit(X, y)
    with pytest.raises(ValueError, match="augmentation is applied per mini-batch"):
        fast(augment_shift=1, batch_size=None, image_shape=(8, 8)).fit(X, y)
    with pytest.raises(ValueError, match=r"less than 8 pixels \(the side of the 8x8 images of X"):
        fast(augment_shift=8).fit(images, y)
    plain = fast(epochs=2).fit(images, y)
    turned = fast(epochs=2, augment_rotate=20.0).fit(images, y)
    assert not np.array_equal(plain.network_.params, turned.network_.params)


# -- threads ----------------------------------------------------------------------------

#: scorers that report the threads the fit in a worker ran on
THREADS = {
    "handprop": lambda est, X, y: est.n_threads_["handprop"],
    "blas": lambda est, X, y: est.n_threads_["blas"],
}


@pytest.mark.parametrize("backend", ["loky", "threading"])
def test_fits_in_joblib_workers_run_on_one_thread_each(backend):
    """loky: worker processes, given 2 threads each by joblib (inner_max_num_threads),
    held to 1 handprop and 1 BLAS thread. threading: handprop's threads held to 1,
    BLAS's left as they are (a thread cannot reliably change OpenBLAS's)."""
    from joblib import parallel_config
    from sklearn.model_selection import GridSearchCV

    X, y = digits(200)
    before = nn.get_threads(), blas_threads()
    config = {"inner_max_num_threads": 2} if backend == "loky" else {}
    with parallel_config(backend=backend, **config):
        grid = GridSearchCV(
            fast(epochs=2),
            {"learning_rate": [0.01, 0.05]},
            cv=2,
            n_jobs=2,
            scoring=THREADS,
            refit=False,
        ).fit(X, y)
    blas = 1 if backend == "loky" else before[1]
    for split in range(2):
        assert grid.cv_results_[f"split{split}_test_handprop"].tolist() == [1, 1]
        assert grid.cv_results_[f"split{split}_test_blas"].tolist() == [blas, blas]
    assert (nn.get_threads(), blas_threads()) == before  # nothing left changed


def test_threads_hold_a_fit_to_that_many_and_are_restored_after():
    X, y = digits(100)
    before = nn.get_threads(), blas_threads()
    assert fast(epochs=1, threads=2).fit(X, y).n_threads_ == {"handprop": 2, "blas": 2}
    assert (nn.get_threads(), blas_threads()) == before
    assert fast(epochs=1).fit(X, y).n_threads_ == {"handprop": before[0], "blas": before[1]}
    with pytest.raises(ValueError, match="threads must be an integer >= 1 or None, got 0"):
        fast(threads=0).fit(X, y)


# -- scikit-learn's tools ---------------------------------------------------------------


def test_joblib_dump_and_load_keep_the_predictions(tmp_path):
    X, y = digits(200)
    for est in (fast(epochs=2), fast(HandpropRegressor, epochs=2)):
        est.fit(X, y)
        joblib.dump(est, tmp_path / "est.joblib")
        again = joblib.load(tmp_path / "est.joblib")
        assert np.array_equal(again.predict(X), est.predict(X))


def test_inspection_and_displays():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.inspection import PartialDependenceDisplay, permutation_importance
    from sklearn.metrics import ConfusionMatrixDisplay

    X, y = digits(300)
    clf = fast(epochs=10).fit(X, y)
    importance = permutation_importance(clf, X, y, n_repeats=2, random_state=0)
    assert importance.importances_mean.shape == (64,) and importance.importances_mean.max() > 0
    assert ConfusionMatrixDisplay.from_estimator(clf, X, y).confusion_matrix.sum() == 300
    reg = fast(HandpropRegressor, epochs=10).fit(X, y.astype(float))
    shown = PartialDependenceDisplay.from_estimator(reg, X, [28, 36], grid_resolution=5)
    assert len(shown.pd_results) == 2 and shown.pd_results[0]["average"].shape[0] == 1
    plt.close("all")


def test_cross_val_score_of_the_regressor():
    from sklearn.model_selection import cross_val_score

    X, y = digits(400)
    est = fast(HandpropRegressor, hidden_layer_sizes=(32,), epochs=40, learning_rate=0.01)
    assert cross_val_score(est, X, y.astype(float), cv=3).mean() > 0.4  # R^2
