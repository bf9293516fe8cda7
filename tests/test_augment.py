import numpy as np

from handprop.augment import shift_rotate, warp


def test_zero_transform_is_the_identity(rng):
    X = rng.random((3, 2, 6, 5)).astype(np.float32)
    out = warp(X, np.zeros(3), np.zeros(3), np.zeros(3))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, X, atol=1e-6)


def test_quarter_turn_matches_rot90(rng):
    X = rng.random((2, 1, 6, 6))
    out = warp(X, np.zeros(2), np.zeros(2), np.full(2, np.pi / 2))
    np.testing.assert_allclose(out, np.rot90(X, -1, axes=(2, 3)), atol=1e-12)


def test_shifts_move_pixels_and_fill_with_background(rng):
    X = rng.random((2, 1, 5, 5)) + 1  # no zeros inside
    out = warp(X, np.array([1, 0]), np.array([0, -2]))
    np.testing.assert_array_equal(out[0, :, 1:], X[0, :, :-1])  # down by one
    assert not out[0, :, 0].any()  # the row that came from outside is background
    np.testing.assert_array_equal(out[1, :, :, :-2], X[1, :, :, 2:])  # left by two
    assert not out[1, :, :, -2:].any()


def test_random_draws_are_seeded_and_bounded():
    X = np.zeros((50, 1, 9, 9))
    X[:, 0, 4, 4] = 1
    a = shift_rotate(X, np.random.default_rng(3), max_shift=2)
    b = shift_rotate(X, np.random.default_rng(3), max_shift=2)
    np.testing.assert_array_equal(a, b)
    ys, xs = np.nonzero(a[:, 0])[1:]
    assert ys.min() >= 2 and ys.max() <= 6 and xs.min() >= 2 and xs.max() <= 6
    assert len(set(zip(ys.tolist(), xs.tolist(), strict=True))) > 10  # really random
