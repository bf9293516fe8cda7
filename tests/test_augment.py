import numpy as np
import pytest

from handprop.data.augment import shift_rotate, warp
from handprop.errors import ConfigError


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


# -- elastic distortions (Simard et al. 2003) ------------------------------------------


def test_elastic_distortions_are_seeded_and_keep_shape_and_dtype(rng):
    from handprop.data.augment import elastic

    X = rng.random((6, 1, 28, 28)).astype(np.float32)
    a = elastic(X, np.random.default_rng(7), alpha=34, sigma=4)
    b = elastic(X, np.random.default_rng(7), alpha=34, sigma=4)
    c = elastic(X, np.random.default_rng(8), alpha=34, sigma=4)
    assert a.shape == X.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)  # the same generator state, the same distortions
    assert not np.array_equal(a, c) and not np.array_equal(a, X)
    assert a.min() >= 0 and a.max() <= 1  # bilinear: a convex mix of pixels and background


def test_elastic_alpha_zero_is_the_identity(rng):
    from handprop.data.augment import augment, elastic

    X = rng.random((3, 2, 9, 7))
    np.testing.assert_array_equal(elastic(X, np.random.default_rng(1), alpha=0), X)
    # augment() without elastic is shift_rotate itself, draw for draw
    np.testing.assert_array_equal(
        augment(X, np.random.default_rng(2), 2, 10.0, 0.0),
        shift_rotate(X, np.random.default_rng(2), 2, 10.0),
    )
    # an elastic field of alpha 0 on top of a zero shift and rotation moves nothing
    np.testing.assert_allclose(augment(X, np.random.default_rng(2), 0, 0.0, 1e-12), X, atol=1e-9)


def test_the_displacement_field_is_a_smoothed_uniform_field():
    from scipy.ndimage import gaussian_filter

    from handprop.data.augment import elastic_field, gaussian_matrix

    v = np.random.default_rng(0).normal(size=28)
    for sigma in (1.5, 4.0, 10.0):  # the matrix smooths as scipy.ndimage does (reflect)
        np.testing.assert_allclose(gaussian_matrix(28, sigma) @ v, gaussian_filter(v, sigma))
    dy, dx = elastic_field(np.random.default_rng(3), 50, 28, 28, alpha=34, sigma=4)
    D = np.random.default_rng(3).uniform(-1, 1, size=(2, 50, 28, 28))
    expect = 34 * gaussian_filter(D, sigma=(0, 0, 4, 4))
    np.testing.assert_allclose(dy, expect[0], atol=1e-12)
    np.testing.assert_allclose(dx, expect[1], atol=1e-12)
    # Simard's alpha 34, sigma 4: displacements of about a pixel and a half
    assert 1.0 < dy[:, 8:20, 8:20].std() < 2.0


def test_a_uniform_displacement_moves_the_image_bilinearly(rng):
    from handprop.data.augment import bilinear

    X = rng.random((2, 1, 6, 6))
    yy, xx = np.mgrid[0:6, 0:6].astype(float)
    half = bilinear(X, np.broadcast_to(yy, (2, 6, 6)), np.broadcast_to(xx + 0.5, (2, 6, 6)))
    np.testing.assert_allclose(half[..., :5], (X[..., :5] + X[..., 1:]) / 2)
    np.testing.assert_allclose(half[..., 5], X[..., 5] / 2)  # half from the background


def test_bilinear_matches_the_four_neighbour_formula_at_every_position(rng):
    """Each output pixel, read one by one: inside, the four neighbours' mix (those beyond
    the edge 0); on or past -1 and h (or w), 0. Negative pixels, several channels, exact
    edges and positions far outside included."""
    from handprop.data.augment import bilinear

    n, c, h, w = 3, 2, 5, 7
    X = rng.standard_normal((n, c, h, w))
    src_y = rng.uniform(-3, h + 2, (n, h, w))
    src_x = rng.uniform(-3, w + 2, (n, h, w))
    src_y[0, 0] = [-1, -0.999, 0, h - 1, h - 0.001, h, 1e6]
    src_x[1, 0] = [-1, -0.999, 0, w - 1, w - 0.001, w, -1e6]

    def pixel(i, ch, y, x):
        if not (-1 < y < h and -1 < x < w):
            return 0.0
        y0, x0 = int(np.floor(y)), int(np.floor(x))
        fy, fx = y - y0, x - x0

        def at(r, q):
            return X[i, ch, r, q] if 0 <= r < h and 0 <= q < w else 0.0

        top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
        bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
        return top * (1 - fy) + bottom * fy

    out = bilinear(X, src_y, src_x)
    want = np.array(
        [
            [
                [[pixel(i, ch, src_y[i, r, q], src_x[i, r, q]) for q in range(w)] for r in range(h)]
                for ch in range(c)
            ]
            for i in range(n)
        ]
    )
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    assert not out[0, :, 0, [0, 5, 6]].any() and not out[1, :, 0, [0, 5, 6]].any()


# -- settings that mean nothing for the images at hand ------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"elastic_alpha": 34, "elastic_sigma": 1e6},
            "augment_elastic_sigma must be > 0 and at most 8 pixels (the side of the 8x8 "
            "images of digits), got 1000000.0",
        ),
        ({"elastic_alpha": 34, "elastic_sigma": 8.5}, "augment_elastic_sigma must be > 0"),
        ({"elastic_alpha": 34, "elastic_sigma": float("nan")}, "augment_elastic_sigma must"),
        (
            {"max_shift": 8},
            "augment_shift must be an integer >= 0 and less than 8 pixels (the side of the "
            "8x8 images of digits), got 8",
        ),
        ({"max_shift": -1}, "augment_shift must be an integer >= 0"),
        ({"max_degrees": 181.0}, "augment_rotate must be in [0, 180] degrees, got 181.0"),
        ({"max_scale": 1.0}, "augment_scale must be in [0, 1) (a fraction), got 1.0"),
        ({"max_scale": -0.1}, "augment_scale must be in [0, 1)"),
        ({"max_scale": float("nan")}, "augment_scale must be in [0, 1)"),
        ({"elastic_alpha": -1.0}, "augment_elastic_alpha must be a finite number >= 0, got -1.0"),
        ({"elastic_alpha": float("inf")}, "augment_elastic_alpha must be a finite number >= 0"),
    ],
)
def test_settings_beyond_the_image_are_refused_naming_the_field(settings, message):
    from handprop.data.augment import check_augment

    with pytest.raises(ConfigError) as info:
        check_augment((8, 8), **settings, dataset="digits")
    assert str(info.value).startswith(message)


def test_settings_within_the_image_pass():
    from handprop.data.augment import check_augment

    check_augment((8, 8), 7, 180.0, 34.0, 8.0)
    check_augment((28, 28), 2, 10.0, 34.0, 4.0)
    check_augment((8, 8), 0, 0.0, 0.0, 1e6)  # alpha 0: sigma is not used
    check_augment((28, 28), max_scale=0.999)


# -- changes of size ---------------------------------------------------------------------


def test_a_scale_moves_each_pixel_away_from_the_centre_by_its_factor():
    from handprop.data.augment import sources

    n, h, w = 3, 9, 7
    scale = np.array([0.5, 1.0, 2.0])
    zero = np.zeros(n)
    src_y, src_x = sources(n, h, w, zero, zero, None, scale)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    for k in range(n):  # output pixel p is read at centre + (p - centre) / scale
        np.testing.assert_allclose(src_y[k], cy + (yy - cy) / scale[k])
        np.testing.assert_allclose(src_x[k], cx + (xx - cx) / scale[k])
    # with a turn and a shift: scaled, turned, then moved, as the docstring says
    theta, dy, dx = np.array([0.3, -1.0, 2.0]), np.array([1, 0, -2]), np.array([0, 2, 1])
    src_y, src_x = sources(n, h, w, dy, dx, theta, scale)
    ys, xs = (yy - cy) / scale[:, None, None], (xx - cx) / scale[:, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    np.testing.assert_allclose(src_y, cos * ys - sin * xs + cy - dy[:, None, None])
    np.testing.assert_allclose(src_x, sin * ys + cos * xs + cx - dx[:, None, None])


def test_an_enlarged_image_shows_its_point_farther_out():
    X = np.zeros((2, 1, 9, 9))
    X[:, 0, 4, 6] = 1.0  # 2 pixels right of the centre (4, 4)
    out = warp(X, np.zeros(2), np.zeros(2), None, np.array([1.5, 0.5]))
    assert out[0, 0, 4, 7] == 1.0  # 1.5 x 2 = 3 pixels out
    assert out[1, 0, 4, 5] == 1.0  # 0.5 x 2 = 1 pixel out
    assert out[0, 0, 4, 6] == pytest.approx(1 / 3)  # read at 4.67: a third of the point


def test_turning_the_scale_on_keeps_the_other_draws():
    """The factors are drawn after the shifts and angles and before the elastic field,
    so a config without augment_scale keeps the batches it had, and one with it moves
    each image as before, only resized."""
    from handprop.data.augment import augment, moves

    plain = moves(np.random.default_rng(4), 5, 2, 10.0)
    sized = moves(np.random.default_rng(4), 5, 2, 10.0, 0.1)
    for a, b in zip(plain[:3], sized[:3], strict=True):
        np.testing.assert_array_equal(a, b)
    assert plain[3] is None
    assert np.all(np.abs(sized[3] - 1) <= 0.1) and len(np.unique(sized[3])) == 5
    X = np.random.default_rng(5).random((5, 1, 12, 12))
    np.testing.assert_array_equal(  # max_scale 0 is the augmentation without it
        augment(X, np.random.default_rng(6), 2, 10.0, 3.0, 2.0, max_scale=0.0),
        augment(X, np.random.default_rng(6), 2, 10.0, 3.0, 2.0),
    )
    assert not np.array_equal(
        augment(X, np.random.default_rng(6), 2, 10.0, 3.0, 2.0, max_scale=0.1),
        augment(X, np.random.default_rng(6), 2, 10.0, 3.0, 2.0),
    )


def test_the_smoothing_kernel_is_bounded_by_the_image():
    from handprop.data.augment import gaussian_matrix

    K = gaussian_matrix(8, 8.0)  # the widest sigma: a (8, 65) work array, no more
    assert K.shape == (8, 8) and np.allclose(K.sum(axis=1), 1)
    with pytest.raises(ValueError, match=r"sigma must be in \(0, 8\] \(the size\), got 1000000.0"):
        gaussian_matrix(8, 1e6)  # asked for a (8, 8e6) array: 1.8 GB on 28x28


def test_a_run_with_a_sigma_wider_than_the_images_is_one_line_and_no_folder(tmp_path):
    from click.testing import CliRunner

    from handprop.cli import main

    config = tmp_path / "wide.toml"
    config.write_text(
        'dataset = "digits"\ntotal = 400\ntrain = 300\ntest = 100\nhidden = 8\n'
        "learning_rate = 0.5\nepochs = 1\nbatch_size = 50\n"
        f'augment_elastic_alpha = 34\naugment_elastic_sigma = 1e6\nout = "{tmp_path / "out"}"\n'
    )
    result = CliRunner().invoke(main, ["train", str(config), "-q"], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "handprop: error: augment_elastic_sigma must be > 0 and at most 8 pixels (the side "
        "of the 8x8 images of digits), got 1000000.0"
    ]
    assert not (tmp_path / "out").exists()  # refused before any folder is made


def test_bilinear_gives_nan_at_a_nan_position_and_reads_nothing_outside(rng):
    from handprop.data.augment import bilinear

    X = rng.random((2, 1, 4, 4))
    src = np.zeros((2, 4, 4))
    src[1, 2, 3] = np.nan
    with np.errstate(invalid="ignore"):  # the NaN's cast to an index
        out = bilinear(X, src, src.copy())
    assert np.isnan(out[1, 0, 2, 3])
    assert np.isfinite(np.delete(out.ravel(), np.ravel_multi_index((1, 0, 2, 3), out.shape))).all()
