"""Optimizers: first steps against the formulas computed by hand; convergence on a toy."""

import numpy as np
import pytest

from handprop.errors import ConfigError
from handprop.nn import OPTIMIZERS, SGD, Adam, Momentum, Nesterov, Network, RMSprop, Schedule

P0 = np.array([1.0, -2.0, 0.5])
G1 = np.array([0.5, 0.25, -1.0])
G2 = np.array([-0.5, 0.5, 2.0])


def two_steps(opt):
    p = P0.copy()
    opt.step(p, G1.copy())
    first = p.copy()
    opt.step(p, G2.copy())
    return first, p


def test_sgd():
    first, second = two_steps(SGD(0.1))
    np.testing.assert_allclose(first, [0.95, -2.025, 0.6])
    np.testing.assert_allclose(second, [1.0, -2.075, 0.4])


def test_momentum_by_hand():
    # v1 = g1 = [.5, .25, -1];            p1 = p0 - .1 v1 = [.95, -2.025, .6]
    # v2 = .9 v1 + g2 = [-.05, .725, 1.1]; p2 = p1 - .1 v2 = [.955, -2.0975, .49]
    first, second = two_steps(Momentum(0.1, momentum=0.9))
    np.testing.assert_allclose(first, [0.95, -2.025, 0.6])
    np.testing.assert_allclose(second, [0.955, -2.0975, 0.49])


def test_nesterov_by_hand():
    # v1 = g1;  p1 = p0 - .1 (g1 + .9 v1) = p0 - .19 g1 = [.905, -2.0475, .69]
    # v2 = [-.05, .725, 1.1];  p2 = p1 - .1 (g2 + .9 v2) = p1 - .1 [-.545, 1.1525, 2.99]
    first, second = two_steps(Nesterov(0.1, momentum=0.9))
    np.testing.assert_allclose(first, [0.905, -2.0475, 0.69])
    np.testing.assert_allclose(second, [0.9595, -2.16275, 0.391])


def test_adam_by_hand():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    first, second = two_steps(Adam(lr, beta1=b1, beta2=b2, eps=eps))
    # step 1: m_hat = g1, v_hat = g1^2, so p1 = p0 - lr * g1 / (|g1| + eps) ~ p0 - lr sign(g1)
    np.testing.assert_allclose(first, P0 - lr * G1 / (np.abs(G1) + eps), rtol=1e-12)
    m = (1 - b1) * (b1 * G1 + G2)
    v = (1 - b2) * (b2 * G1**2 + G2**2)
    m_hat, v_hat = m / (1 - b1**2), v / (1 - b2**2)
    np.testing.assert_allclose(second, first - lr * m_hat / (np.sqrt(v_hat) + eps), rtol=1e-12)


def test_rmsprop_by_hand():
    lr, rho, eps = 0.01, 0.9, 1e-8
    first, second = two_steps(RMSprop(lr, rho=rho, eps=eps))
    s1 = (1 - rho) * G1**2
    np.testing.assert_allclose(first, P0 - lr * G1 / (np.sqrt(s1) + eps), rtol=1e-12)
    s2 = rho * s1 + (1 - rho) * G2**2
    np.testing.assert_allclose(second, first - lr * G2 / (np.sqrt(s2) + eps), rtol=1e-12)


def test_weight_decay_applies_to_weights_only():
    mask = np.array([True, True, False])  # the last entry is a bias
    p = P0.copy()
    SGD(0.1, weight_decay=0.5, decay_mask=mask).step(p, G1.copy())
    # g + 0.5 p on the weights: [.5 + .5, .25 - 1, -1 + 0]
    np.testing.assert_allclose(p, P0 - 0.1 * np.array([1.0, -0.75, -1.0]))


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_state_round_trips_and_steps_never_touch_grads(kind):
    a, b = OPTIMIZERS[kind](0.05), OPTIMIZERS[kind](0.05)
    pa, pb = P0.copy(), P0.copy()
    g = G1.copy()
    a.step(pa, g)
    np.testing.assert_array_equal(g, G1)  # the gradient vector is left as it was
    b.step(pb, G1.copy())
    b.load_state_dict({k: np.array(v, copy=True) for k, v in a.state_dict().items()}, pa)
    a.step(pa, G2.copy())
    b.step(pb, G2.copy())
    np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("kind", ["adam", "momentum", "rmsprop"])
def test_load_state_refuses_what_does_not_fit_the_parameters(kind):
    a = OPTIMIZERS[kind](0.05)
    p = P0.copy()
    a.step(p, G1.copy())
    state = a.state_dict()
    name = a.state_names[0]
    with pytest.raises(ValueError, match=f"state {name!r} is float64\\[2\\], expected"):
        OPTIMIZERS[kind](0.05).load_state_dict({**state, name: state[name][:2]}, p)
    with pytest.raises(ValueError, match="missing after 1 steps"):
        OPTIMIZERS[kind](0.05).load_state_dict({"t": state["t"]}, p)
    with pytest.raises(ValueError, match="integer >= 0, got -5"):
        OPTIMIZERS[kind](0.05).load_state_dict({**state, "t": np.array(-5)}, p)
    with pytest.raises(ValueError, match="not one of"):
        OPTIMIZERS[kind](0.05).load_state_dict({**state, "bogus": state[name]}, p)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_float32_stays_float32(kind):
    p = P0.astype(np.float32)
    opt = OPTIMIZERS[kind](0.05)
    opt.step(p, G1.astype(np.float32))
    assert p.dtype == np.float32
    assert all(v.dtype == np.float32 for v in opt.state.values())


@pytest.mark.parametrize(
    "kind, lr",
    [("sgd", 0.5), ("momentum", 0.1), ("nesterov", 0.1), ("adam", 0.05), ("rmsprop", 0.02)],
)
def test_converges_on_a_toy_problem(kind, lr, rng):
    X = rng.normal(size=(60, 2))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    net = Network.from_spec("2-8-2", activation="tanh", init="glorot_uniform", rng=1)
    opt = OPTIMIZERS[kind](lr)
    X = net.check_input(X)
    for _ in range(300):
        net.loss_and_grad(X, y)
        opt.step(net.params, net.grads)
    assert (net.predict(X) == y).mean() >= 0.95


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0}, "learning rate must be"),
        ({"lr": float("nan")}, "learning rate must be"),
        ({"lr": 0.1, "weight_decay": -1}, "weight decay"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SGD(**kwargs)
    with pytest.raises(ConfigError, match="beta1"):
        Adam(0.1, beta1=1.0)


def test_schedules():
    assert [Schedule("constant", 5).factor(e) for e in (1, 5)] == [1, 1]
    step = Schedule("step", 30, gamma=0.5, step_size=10)
    assert [step.factor(e) for e in (1, 10, 11, 21, 30)] == [1, 1, 0.5, 0.25, 0.25]
    expo = Schedule("exponential", 10, gamma=0.9)
    assert expo.factor(3) == pytest.approx(0.81)
    cos = Schedule("cosine", 11)
    assert cos.factor(1) == 1 and cos.factor(6) == pytest.approx(0.5) and cos.factor(11) == 0
    warm = Schedule("cosine", 13, warmup=2)
    assert [warm.factor(1), warm.factor(2), warm.factor(3)] == [
        pytest.approx(1 / 3),
        pytest.approx(2 / 3),
        1,
    ]
    assert warm.factor(13) == pytest.approx(0)
    with pytest.raises(ConfigError, match="unknown schedule 'linear'"):
        Schedule("linear", 10)


def test_the_one_cycle_rises_to_its_peak_then_falls_to_zero_along_a_half_cosine():
    cycle = Schedule("onecycle", epochs=2, peak=0.25)
    assert cycle.per_step and not Schedule("cosine", 2).per_step
    assert cycle.factor(1, 0.0) == pytest.approx(1 / 25)  # 1/25 of the rate at the start
    assert cycle.factor(1, 0.25) == pytest.approx(1 / 25 + (1 - 1 / 25) / 2)  # u = 1/8
    assert cycle.factor(1, 0.5) == pytest.approx(1)  # the peak, a quarter of training
    assert cycle.factor(2, 0.25) == pytest.approx(0.5)  # u = 5/8: half way down
    assert cycle.factor(3, 0.0) == pytest.approx(0)  # the end of training
    # rising, then falling
    us = [cycle.factor(1 + k // 10, (k % 10) / 10) for k in range(20)]
    assert us[:6] == sorted(us[:6]) and us[5:] == sorted(us[5:], reverse=True)
    with pytest.raises(ConfigError, match="one-cycle peak"):
        Schedule("onecycle", 2, peak=1.0)


def test_a_per_step_schedule_sets_the_rate_of_every_step():
    from handprop.nn import OPTIMIZERS

    cycle = Schedule("onecycle", epochs=2)
    opt = OPTIMIZERS["sgd"](0.1, schedule=cycle)
    p, seen = np.zeros(3), []
    for epoch in (1, 2):
        opt.set_epoch(epoch, steps=4)
        for _ in range(4):
            opt.step(p, np.ones(3))
            seen.append(opt.lr)
    expected = [0.1 * cycle.factor(e, k / 4) for e in (1, 2) for k in range(4)]
    assert seen == pytest.approx(expected)
    assert p == pytest.approx(-sum(expected) * np.ones(3))  # each step at its own rate


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_split_over_threads_gives_the_same_numbers(dtype):
    """Adam's update runs in one block per thread on a large vector: elementwise, so the
    numbers must not depend on the thread count."""
    from handprop.nn import set_threads
    from handprop.nn.threads import MIN_PARALLEL, get_threads

    rng = np.random.default_rng(0)
    n = 3 * MIN_PARALLEL + 7
    p0 = rng.normal(size=n).astype(dtype)
    grads = [rng.normal(size=n).astype(dtype) for _ in range(3)]
    before = get_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            set_threads(threads)
            p, opt = p0.copy(), Adam(1e-2)
            for g in grads:
                opt.step(p, g.copy())
            results.append(p)
    finally:
        set_threads(before)
    assert results[0].dtype == dtype
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_the_optimizer_owns_the_learning_rate_and_its_schedule():
    from handprop.nn import OPTIMIZERS, Schedule

    schedule = Schedule("cosine", epochs=5, warmup=1)
    opt = OPTIMIZERS["adam"](0.01, schedule=schedule)
    for epoch in range(1, 6):
        opt.set_epoch(epoch)
        assert opt.lr == 0.01 * schedule.factor(epoch)
    assert opt.lr == 0.0 and opt.base_lr == 0.01  # the cosine's last epoch
    plain = OPTIMIZERS["sgd"](0.5)
    plain.set_epoch(7)
    assert plain.lr == 0.5


# -- subnormal state ------------------------------------------------------------------


@pytest.mark.parametrize("dtype, exact_from", [(np.float32, -77), (np.float64, -915)])
def test_flush_subnormal_zeroes_subnormals_and_keeps_every_other_value(dtype, exact_from, rng):
    from handprop.nn.kernels import flush_subnormal

    info = np.finfo(dtype)
    subnormal = np.array([info.smallest_subnormal, -info.smallest_subnormal, info.tiny / 3])
    a = subnormal.astype(dtype)
    flush_subnormal(a)
    np.testing.assert_array_equal(a, 0)
    # from 2^exact_from up (and 0), to the bit; between, by at most 2^(exact_from - 24)
    x = rng.choice([-1, 1], size=20000) * np.exp2(rng.uniform(exact_from, 60, size=20000))
    x = np.append(x, [0.0, np.exp2(exact_from), -np.exp2(exact_from)]).astype(dtype)
    kept = x.copy()
    flush_subnormal(kept)
    np.testing.assert_array_equal(kept, x)
    x = np.exp2(rng.uniform(np.log2(info.tiny), exact_from, size=20000)).astype(dtype)
    moved = x.copy()
    flush_subnormal(moved)
    assert np.max(np.abs(moved - x)) <= np.exp2(exact_from - 24)


@pytest.mark.parametrize("kind", ["adam", "momentum", "nesterov", "rmsprop"])
def test_state_of_parameters_without_gradient_never_goes_subnormal(kind, rng, monkeypatch):
    """A dead unit's state decays by a factor each step; it never reaches the subnormal
    numbers (where a CPU computes slowly), and the parameters move exactly as they do
    when the state is left to go subnormal."""
    from handprop.nn import kernels

    settings = {"adam": {"beta1": 0.7, "beta2": 0.9}}
    tiny = np.finfo(np.float32).tiny
    gradients = []
    for step in range(1500):  # 0.9^1500 = 1e-69: every factor takes the state that far
        g = np.zeros(64, np.float32)
        if step < 5:  # every unit learns a little, then half of them never again
            g[:] = rng.normal(size=64)
        elif step % 2:
            g[:32] = rng.normal(size=32) * 1e-3
        gradients.append(g)
    p0 = rng.normal(size=64).astype(np.float32)

    def train() -> tuple[np.ndarray, int, float]:
        """The parameters after the steps, how many steps left some state subnormal,
        and the largest state of a dead unit at the end."""
        opt, p, steps = OPTIMIZERS[kind](0.01, **settings.get(kind, {})), p0.copy(), 0
        for g in gradients:
            opt.step(p, g.copy())
            steps += any(np.any((s != 0) & (np.abs(s) < tiny)) for s in opt.state.values())
        return p, steps, max(float(np.max(np.abs(s[32:]))) for s in opt.state.values())

    flushed, subnormal_steps, dead = train()
    assert subnormal_steps == 0 and dead < 1e-36
    monkeypatch.setattr(kernels, "flush_subnormal", lambda a: None)
    unflushed, subnormal_steps, _ = train()
    assert subnormal_steps > 100  # what the flush is there for
    np.testing.assert_array_equal(flushed, unflushed)
