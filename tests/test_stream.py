"""Streaming accumulators (``linalg.stream``): folding one client at a time gives the all-at-once results (exactly,
to round-off, for the exact ones; within the recorded error for the sketch) in memory that stops growing with the
number of clients. References: numpy float64 on the dense sum, and the all-at-once routes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import fedmomentum as fm
from fedmomentum import linalg
from linalg_helpers import EPS, dense, drift_terms, flat_terms, reconstruction, roundoff


def fold_all(accumulator, t: linalg.Terms):
    for L, R, w in zip(t.lefts, t.rights, t.weights, strict=True):
        accumulator.fold(L, R, w)
    return accumulator


def normalized(t: linalg.Terms) -> linalg.Terms:
    """The same terms with weights ``p_i = w_i / Σ w_j`` (what ``finish()`` divides by)."""
    total = sum(t.weights)
    return linalg.Terms(t.lefts, t.rights, [w / total for w in t.weights])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_factor_sum_is_the_weighted_mean(dtype):
    rng = np.random.default_rng(0)
    tensors = [torch.tensor(rng.standard_normal((7, 5)), dtype=dtype) for _ in range(40)]
    weights = list(rng.integers(1, 100, 40))
    acc = linalg.FactorSum()
    for X, w in zip(tensors, weights, strict=True):
        acc.fold(X, w)
        assert acc.nbytes == 7 * 5 * tensors[0].element_size()  # one tensor's worth, whatever the count
    expected = sum(w * X.double() for X, w in zip(tensors, weights, strict=True)) / sum(weights)
    tol = 4 * len(tensors) * EPS[dtype] * max(float(X.abs().max()) for X in tensors)  # summation round-off
    torch.testing.assert_close(acc.finish().double(), expected, rtol=0, atol=tol)
    torch.testing.assert_close(acc.finish(scale=2.0).double(), 2 * expected * sum(weights), rtol=0,
                               atol=2 * sum(weights) * tol)
    assert acc.count == 40 and acc.weight == sum(weights)
    with pytest.raises(ValueError, match="cannot join"):
        acc.fold(torch.zeros(5, 7, dtype=dtype))
    with pytest.raises(ValueError, match="finite"):
        acc.fold(tensors[0], math.nan)
    with pytest.raises(ValueError, match="nothing was folded"):
        linalg.FactorSum().finish()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_product_sum_while_held_as_factors_is_the_all_at_once_route(dtype):
    rng = np.random.default_rng(1)
    t = drift_terms(rng, 60, 44, 3, 5, dtype=dtype)  # 15 columns: the factors take less room than the matrix
    acc = fold_all(linalg.ProductSum((60, 44), dtype=dtype), t)
    assert not acc.is_dense and acc.rank == 15
    streamed = acc.finish()
    at_once = linalg.decompose({"layer": normalized(t)})["layer"]
    assert streamed.route == at_once.route == "factored"
    M = dense(normalized(t))
    tol = roundoff(normalized(t))
    for svd in (streamed, at_once):
        np.testing.assert_allclose(reconstruction(svd), M, rtol=0, atol=tol)
        np.testing.assert_allclose((svd.L.double() @ svd.R.double()).numpy(), M, rtol=0, atol=tol)
    np.testing.assert_allclose(streamed.S.double().numpy(), at_once.S.double().numpy(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_product_sum_turns_dense_and_stops_growing_and_stays_exact(dtype):
    rng = np.random.default_rng(2)
    d, k, r = 40, 30, 3
    t = flat_terms(rng, d, k, r, 60, dtype=dtype)  # 180 columns: far more than the 40×30 matrix holds
    acc = linalg.ProductSum((d, k), dtype=dtype)
    sizes = []
    for L, R, w in zip(t.lefts, t.rights, t.weights, strict=True):
        acc.fold(L, R, w)
        sizes.append(acc.nbytes)
    item = t.lefts[0].element_size()
    switch = next(i for i, size in enumerate(sizes) if size == d * k * item)  # the first fold held densely
    assert (switch + 1) * r * (d + k) > d * k >= switch * r * (d + k)  # as soon as the factors outgrow the matrix
    assert max(sizes) <= d * k * item and all(size == d * k * item for size in sizes[switch:])
    streamed = acc.finish()
    assert acc.is_dense and streamed.route == "dense"
    p = normalized(t)
    M, tol = dense(p), roundoff(p)
    S = np.linalg.svd(M, compute_uv=False)
    np.testing.assert_allclose(streamed.S.double().numpy(), S, rtol=0, atol=tol)
    np.testing.assert_allclose(reconstruction(streamed), M, rtol=0, atol=tol)
    np.testing.assert_allclose((streamed.L.double() @ streamed.R.double()).numpy(), M, rtol=0, atol=tol)
    at_once = linalg.decompose({"layer": p})["layer"]  # q = 180 > min(d, k): the dense route too
    assert at_once.route == "dense"
    np.testing.assert_allclose(streamed.S.double().numpy(), at_once.S.double().numpy(), rtol=0, atol=tol)


def test_a_dense_product_sum_of_cancelling_terms_compresses_to_nothing():
    """The dense matrix alone cannot tell round-off from signal; the accumulated size of the terms can."""
    rng = np.random.default_rng(3)
    t = flat_terms(rng, 12, 10, 4, 3)
    acc = linalg.ProductSum((12, 10))
    for L, R in zip(t.lefts, t.rights, strict=True):
        acc.fold(L, R, 1.0)
        acc.fold(L, R, -1.0)  # B A − B A
    assert acc.is_dense
    svd = acc.finish(scale=1.0)
    assert linalg.compress(fm.LowRank(svd.L, svd.R), svd).rank == 0


def test_a_product_sum_rejects_bad_terms():
    acc = linalg.ProductSum((6, 5))
    with pytest.raises(ValueError, match="do not make a 6×5 term"):
        acc.fold(torch.zeros(6, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="finite"):
        acc.fold(torch.zeros(6, 2), torch.zeros(2, 5), math.inf)
    with pytest.raises(ValueError, match="nothing was folded"):
        acc.finish()
    acc.fold(torch.ones(6, 2), torch.ones(2, 5))
    with pytest.raises(ValueError, match="decomposed exactly"):
        acc.finish(kind="sketch")


def test_a_product_sketch_is_exact_while_the_terms_fit_its_width():
    rng = np.random.default_rng(4)
    t = flat_terms(rng, 50, 40, 3, 4, dtype=torch.float64)  # rank 12 ≤ width 16
    svd = fold_all(linalg.ProductSketch((50, 40), 16, dtype=torch.float64), t).finish()
    p = normalized(t)
    assert svd.route == "sketch" and svd.error <= 1e-10
    np.testing.assert_allclose(reconstruction(svd), dense(p), rtol=0, atol=roundoff(p))


@pytest.mark.parametrize("seed", range(3))
def test_a_product_sketch_estimates_its_error_and_agrees_with_the_all_at_once_sketch(seed):
    rng = np.random.default_rng(seed)
    d, k = 200, 160
    t = drift_terms(rng, d, k, 4, 100, spread=0.2, dtype=torch.float64)
    p = normalized(t)
    M = dense(p)
    acc = linalg.ProductSketch((d, k), 40, seed=seed, dtype=torch.float64)
    before = acc.nbytes
    streamed = fold_all(acc, t).finish()
    assert acc.nbytes == before  # fixed memory
    true = np.linalg.norm(reconstruction(streamed) - M) / np.linalg.norm(M)
    assert streamed.error / 3 <= true <= 3 * streamed.error and true < 0.05
    at_once = linalg.decompose({"layer": p}, "sketch", energy=0.99)["layer"]
    gap = np.linalg.norm(reconstruction(streamed) - reconstruction(at_once)) / np.linalg.norm(M)
    assert gap <= 3 * (streamed.error + at_once.error)  # both within their recorded errors of M


@pytest.mark.parametrize("method, options", [
    ("fedmomentum", {}),
    ("fedmomentum", {"residual_energy": 0.9}),
    ("flexlora", {}),
    ("flora", {}),
])
@pytest.mark.parametrize("clients", [4, 40], ids=["factored", "dense"])
def test_a_method_given_the_streamed_svd_returns_the_all_at_once_aggregate(method, options, clients):
    """What a method needs of the stream: ``aggregate_layer(..., svd=ProductSum.finish())`` (folding ``B_i`` with
    weight ``n_i``) gives ``aggregate``'s layer, whether the sum was held as factors or densely."""
    g = torch.Generator().manual_seed(clients)
    d, k, r, scaling = 24, 20, 2, 2.0
    name = "model.layers.0.self_attn.q_proj"
    global_lora = {name: fm.LoraPair(torch.randn(r, k, generator=g), torch.randn(d, r, generator=g))}
    updates = [fm.ClientUpdate({name: fm.LoraPair(torch.randn(r, k, generator=g), torch.randn(d, r, generator=g))},
                               num_examples=3 + i) for i in range(clients)]
    m = fm.methods.create(method, **options)
    expected = m.aggregate(global_lora, updates, scaling=scaling)
    acc = linalg.ProductSum((d, k))
    for u in updates:
        acc.fold(u.factors[name].B, u.factors[name].A, u.num_examples)
    assert acc.is_dense == (clients == 40)
    weights = m.client_weights(updates)
    clients_ = [u.factors[name] for u in updates]
    terms = m.svd_terms(name, global_lora[name], clients_, weights, scaling, 1)
    svd = acc.finish(scale=scaling / sum(u.num_examples for u in updates)) if method == "flora" else acc.finish()
    assert terms is not None
    result = fm.methods.create(method, **options).aggregate_layer(name, global_lora[name], clients_, weights,
                                                                  scaling, 1, svd, {})
    new, delta, stats = result.lora, result.backbone, result.stats
    M = sum(w * c.B.double() @ c.A.double() for w, c in zip(weights, clients_, strict=True)) * scaling
    tol = roundoff(linalg.Terms([c.B for c in clients_], [c.A for c in clients_], [w * scaling for w in weights]))
    got = scaling * new.delta().double() + (delta.dense().double() if delta is not None else 0)
    want = scaling * expected.lora[name].delta().double() + (expected.backbone[name].dense().double()
                                                             if name in expected.backbone else 0)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=4 * tol)
    if m.exact:
        np.testing.assert_allclose(got.numpy(), M.numpy(), rtol=0, atol=4 * tol)
    for key, value in expected.stats["layers"][name].items():
        if key not in ("svd", "svd_error"):  # the route aggregate() took, which the stream does not report
            assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# --- rounds streamed through the methods (``Method.open_round``) ------------------------------------------------

SHAPES = {"q": (24, 20), "v": (12, 20)}  # out × in


def _round(seed: int, n: int, rank: int = 2, ranks=None, dtype=torch.float32):
    """A global adapter and ``n`` client updates drifting from it (random example counts; ``ranks``: each client's
    own rank, with its scaling)."""
    g = torch.Generator().manual_seed(seed)
    global_lora = {name: fm.LoraPair(torch.randn(rank, k, generator=g, dtype=dtype) / 4,
                                     torch.randn(d, rank, generator=g, dtype=dtype) / 4)
                   for name, (d, k) in SHAPES.items()}
    updates = []
    for i in range(n):
        r = rank if ranks is None else ranks[i % len(ranks)]
        factors = {}
        for name, pair in global_lora.items():
            A = torch.randn(r, pair.A.shape[1], generator=g, dtype=dtype) / 4
            B = torch.randn(pair.B.shape[0], r, generator=g, dtype=dtype) / 4
            if r == rank:
                A, B = pair.A + A / 3, pair.B + B / 3
            factors[name] = fm.LoraPair(A, B)
        scaling = None if ranks is None else 2.0 * rank / r
        updates.append(fm.ClientUpdate(factors, int(torch.randint(1, 50, (1,), generator=g)), f"client_{i}",
                                       scaling=scaling))
    return global_lora, updates


def _streamed(method, global_lora, updates, **kw):
    accumulator = method.open_round(global_lora, **kw)
    for update in updates:
        accumulator.fold(update)
    return accumulator, accumulator.finish()


def _dense_change(result, name, scaling):
    """``s B'A' + D`` of one layer in float64: the change the round makes to the model."""
    pair = result.lora[name]
    change = scaling * pair.B.double() @ pair.A.double()
    if name in result.backbone:
        change += result.backbone[name].left.double() @ result.backbone[name].right.double()
    return change


def _tolerance(global_lora, updates, scaling, dtype, gap_ratio=1.0):
    """Round-off of forming and decomposing ``s Σ p_i B_i A_i`` in ``dtype``: a few ulps of the terms' size per
    term and dimension, times the SVD's sensitivity (‖M‖ / the gap at the kept rank) for a split."""
    size = max(scaling * float(u.factors[n].B.norm() * u.factors[n].A.norm()) for u in updates for n in global_lora)
    d = max(d + k for d, k in SHAPES.values())
    return 8 * (len(updates) + d) * EPS[dtype] * size * gap_ratio


def _gap_ratio(global_lora, updates, method_weights):
    """max over layers of ‖M‖₂ / (σ_r − σ_{r+1}) of ``M = Σ p_i B_i A_i`` (float64): how much round-off moves
    the top-``r`` subspace."""
    worst = 1.0
    for name, g in global_lora.items():
        M = sum(w * u.factors[name].B.double() @ u.factors[name].A.double()
                for u, w in zip(updates, method_weights, strict=True))
        S = torch.linalg.svdvals(M)
        worst = max(worst, float(S[0] / (S[g.rank - 1] - S[g.rank])))
    return worst


CASES = [
    ("fedit", {}, None, 1), ("fedit", {"weighting": "uniform"}, None, 1), ("ffa-lora", {}, None, 1),
    ("rolora", {}, None, 1), ("rolora", {}, None, 2), ("fedsa-lora", {}, None, 1),
    ("fedex-lora", {}, None, 1), ("fedex-lora", {}, [2, 1], 1),
    ("flora", {}, None, 1), ("flora", {}, [1, 2, 3], 1),
    ("flexlora", {}, None, 1), ("flexlora", {"svd": "dense"}, None, 1),
    ("fedmomentum", {}, None, 1), ("fedmomentum", {"svd": "factored"}, [1, 2, 4], 1),
    ("fedmomentum", {"residual_energy": 0.9, "svd": "dense"}, None, 1),
    ("fedmomentum", {"server_opt": "avgm"}, None, 1), ("fedmomentum", {"dtype": "float64"}, None, 1),
]


@pytest.mark.parametrize("n", [3, 14])  # 14 clients take the exact sums past the dense crossover
@pytest.mark.parametrize("name,options,ranks,t", CASES)
def test_a_streamed_round_equals_the_all_at_once_round(name, options, ranks, t, n):
    method = fm.methods.create(name, **options)
    dtype = method.dtype
    global_lora, updates = _round(7 + n, n, ranks=ranks, dtype=dtype)
    scaling = 2.0
    accumulator, streamed = _streamed(method, global_lora, updates, scaling=scaling, t=t)
    assert accumulator.streamed
    expected = method.aggregate(global_lora, updates, scaling=scaling, t=t)
    tol = _tolerance(global_lora, updates, scaling, dtype)
    if method.stream_sums(t) and "product" in method.stream_sums(t) and name in ("flexlora", "fedmomentum"):
        weights = [w * (1.0 if u.scaling is None else u.scaling / scaling)
                   for u, w in zip(updates, method.client_weights(updates), strict=True)]
        tol *= _gap_ratio(global_lora, updates, weights)
    for layer in global_lora:
        for result in (streamed, expected):  # the adapter alone, and the whole change the round makes
            assert result.lora[layer].A.dtype == dtype
        change = (_dense_change(streamed, layer, scaling) - _dense_change(expected, layer, scaling)).abs().max()
        adapter = (streamed.lora[layer].B.double() @ streamed.lora[layer].A.double()
                   - expected.lora[layer].B.double() @ expected.lora[layer].A.double()).abs().max()
        assert float(change) <= tol and scaling * float(adapter) <= tol, (layer, float(change), float(adapter), tol)
        if name in ("fedit", "ffa-lora", "rolora", "fedsa-lora", "fedex-lora"):  # averaged factors: equal as such
            for factor in ("A", "B"):
                diff = getattr(streamed.lora[layer], factor) - getattr(expected.lora[layer], factor)
                assert float(diff.abs().max()) <= tol
        mine, theirs = streamed.stats["layers"][layer], expected.stats["layers"][layer]
        assert set(mine) == set(theirs)
        for key, value in theirs.items():
            if key == "svd":  # either exact route (a streamed sum turns dense once that takes less room)
                assert mine[key] in linalg.EXACT_KINDS and value in linalg.EXACT_KINDS
            elif key == "residual_rank" and "server_opt" in options:  # the optimizer's delta, as its factors:
                assert mine[key] <= value  # a dense sum's SVD factors are no wider than the stacked ones
            elif isinstance(value, float):
                assert mine[key] == pytest.approx(value, rel=1e-3, abs=tol), key
            else:
                assert mine[key] == value, key
    assert streamed.stats["uplink_bytes_per_client"] == expected.stats["uplink_bytes_per_client"]
    assert streamed.stats["clients"] == expected.stats["clients"] == n
    assert set(streamed.state) == set(expected.state)


def test_a_streamed_round_carries_the_held_residual_and_the_optimizer_state():
    """Two rounds of FedMomentum with ``merge_every=2`` and FedAdam: the state streamed round 1 leaves is what the
    all-at-once round leaves, and round 2 from either gives the same result."""
    method = fm.methods.create("fedmomentum", merge_every=2, server_opt="adam")
    global_lora, updates = _round(3, 6)
    _, first = _streamed(method, global_lora, updates, scaling=2.0, t=1)
    expected = method.aggregate(global_lora, updates, scaling=2.0, t=1)
    assert set(first.state) == set(expected.state) and "held_left" in first.state
    _, second = _streamed(method, first.lora, updates, scaling=2.0, t=2, state=first.state)
    reference = method.aggregate(expected.lora, updates, scaling=2.0, t=2, state=expected.state)
    tol = 100 * _tolerance(global_lora, updates, 2.0, torch.float32)  # two rounds, FedAdam's division by √v
    for layer in global_lora:
        diff = _dense_change(second, layer, 2.0) - _dense_change(reference, layer, 2.0)
        assert float(diff.abs().max()) <= tol


def test_the_sketch_route_streams_within_its_recorded_error():
    """``svd="sketch"``: the one-pass sketch's aggregate differs from the exact one by at most what its recorded
    ``svd_error`` allows (relative to ‖M‖), plus round-off."""
    method = fm.methods.create("fedmomentum", svd="sketch")
    exact = fm.methods.create("fedmomentum", svd="factored")
    global_lora, updates = _round(5, 40)
    _, streamed = _streamed(method, global_lora, updates, scaling=2.0)
    reference = exact.aggregate(global_lora, updates, scaling=2.0)
    for layer in global_lora:
        stats = streamed.stats["layers"][layer]
        assert stats["svd"] == "sketch" and 0.0 <= stats["svd_error"] < 1.0
        whole = float(_dense_change(reference, layer, 2.0).norm())
        diff = float((_dense_change(streamed, layer, 2.0) - _dense_change(reference, layer, 2.0)).norm())
        assert diff <= 2 * stats["svd_error"] * whole + _tolerance(global_lora, updates, 2.0, torch.float32)


def test_methods_that_need_every_update_collect_them_and_give_the_same_result():
    method = fm.methods.create("flexlora", svd="randomized")
    global_lora, updates = _round(2, 4)
    accumulator, collected = _streamed(method, global_lora, updates, scaling=2.0)
    assert not accumulator.streamed and not fm.methods.create("frlora").stream_sums(1)
    expected = method.aggregate(global_lora, updates, scaling=2.0)
    for layer in global_lora:
        assert torch.equal(collected.lora[layer].A, expected.lora[layer].A)
    plain = fm.methods.create("fedmomentum").open_round(global_lora, scaling=2.0, stream=False)
    assert not plain.streamed


def test_a_streamed_round_holds_sums_not_updates():
    """The bytes a streamed round holds stop growing once the sums are dense; the collected round's grow with N."""
    method = fm.methods.create("fedmomentum")
    global_lora, updates = _round(4, 40)
    streamed, collected = (method.open_round(global_lora, scaling=2.0, stream=s) for s in (True, False))
    held = []
    for update in updates:
        streamed.fold(update)
        collected.fold(update)
        held.append(streamed.nbytes)
    dense = sum(d * k for d, k in SHAPES.values()) * 4
    assert max(held) <= dense and held[-1] == held[20] == dense
    assert collected.nbytes == sum(4 * (p.A.numel() + p.B.numel()) for u in updates for p in u.factors.values())


def test_fold_checks_each_update_as_it_arrives():
    method = fm.methods.create("fedit")
    global_lora, updates = _round(1, 2)
    accumulator = method.open_round(global_lora, scaling=2.0)
    with pytest.raises(fm.UpdateError, match="no client updates"):
        accumulator.finish()
    accumulator.fold(updates[0])
    bad = updates[1].factors["v"].A.clone()
    bad[0, 0] = math.nan
    with pytest.raises(fm.UpdateError, match="client_1.*'v'.*NaN"):
        accumulator.fold(fm.ClientUpdate({**updates[1].factors, "v": fm.LoraPair(bad, updates[1].factors["v"].B)},
                                         3, "client_1"))
    with pytest.raises(fm.UpdateError, match="num_examples"):
        accumulator.fold(fm.ClientUpdate(updates[1].factors, 0, "client_1"))
    assert accumulator.count == 1  # the refused updates left the sums as they were


# --- rounds streamed through the run loop (``driver.run_round``) ------------------------------------------------


@pytest.mark.parametrize("method,options", [("fedmomentum", {}), ("fedit", {})])
def test_a_run_that_streams_gives_the_run_that_collects(method, options, tmp_path, tiny_model, small_config):
    """The tiny model, one round of 3 clients through the in-process engine, ``stream = always`` against ``never``: the
    same updates (the clients train identically), the same adapter to round-off, the same records
    but ``noise_share`` (not measured when streaming) and ``streamed``."""
    import copy

    from fedmomentum import checkpoint, driver, simulation

    runs = {}
    for streamed in (False, True):
        config = small_config(tmp_path / str(streamed), method=method, method_options=options, rounds=1,
                              clients_per_round=3, clip="none", eval_every=1, accuracy_every=0,
                              stream="always" if streamed else "never")
        simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
        state, _ = checkpoint.load(tmp_path / str(streamed) / driver.CHECKPOINT)
        rows = [json.loads(line) for line in (tmp_path / str(streamed) / "metrics.jsonl").read_text().splitlines()]
        runs[streamed] = state, rows[-1]
    (collected, row), (streamed, streamed_row) = runs[False], runs[True]
    assert streamed_row.get("streamed") is True and "streamed" not in row
    assert streamed_row["client_ids"] == row["client_ids"] and streamed_row["train_loss"] == row["train_loss"]
    assert streamed_row["update_norms"] == row["update_norms"]
    size = max(float(p.B.abs().max() * p.A.abs().max()) for p in collected.lora.values())
    tol = 64 * 3 * EPS[torch.float32] * max(p.A.shape[1] for p in collected.lora.values()) * max(size, 1e-3)
    for name, pair in collected.lora.items():
        other = streamed.lora[name]
        assert float((other.B @ other.A - pair.B @ pair.A).abs().max()) <= tol, name
    assert streamed_row.get("noise_share") is None


@pytest.mark.parametrize("stream,clients_per_round,clip,expected", [
    ("auto", 3, "none", False), ("auto", 64, "none", True), ("always", 3, "none", True),
    ("never", 64, "none", False),
    ("auto", 64, "median", False)])
def test_which_rounds_stream(stream, clients_per_round, clip, expected, tmp_path, small_config):
    """``stream = auto`` from ``STREAM_FROM`` clients a round, ``always`` at any count, ``never`` not at all; not with
    median clipping (it needs every norm first)."""
    from types import SimpleNamespace

    from fedmomentum import build, driver

    config = small_config(tmp_path, clients=64, clients_per_round=clients_per_round, clip=clip, stream=stream)
    assert driver.streams(SimpleNamespace(config=config, method=build.make_method(config)), 1) is expected


def test_stream_always_that_no_round_can_honour_is_refused_before_the_run(tmp_path, fresh_tiny, small_config):
    from fedmomentum import simulation

    config = small_config(tmp_path / "run", clients_per_round=3, stream="always")  # clip = median by default
    with pytest.raises(ValueError, match="stream = always, but no round can stream: median clipping"):
        simulation.run(config, model=fresh_tiny[0], tokenizer=fresh_tiny[1], quiet=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_flower_strategy_folds_each_reply_as_it_arrives(tmp_path, small_config):
    """The Flower engine on the in-process grid (Flower's wire format), one round of three nodes, one of which sends
    NaN factors: streamed, its reply is rejected with the reason and the other two are folded as they arrive (no
    reply kept: the exchange holds None for them); the adapter equals the round that collects, to round-off."""
    from fedmomentum import checkpoint, driver
    from flower_helpers import LocalGrid, faulty_client_app, run_local

    states, records = {}, {}
    for streamed in (False, True):
        config = small_config(tmp_path / str(streamed), rounds=1, clients=3, clients_per_round=3, clip="none",
                              train_per_family=16, accuracy_per_family=0, partition="iid",
                              stream="always" if streamed else "never")
        strategy = run_local(config, LocalGrid(faulty_client_app({2: "nan"}), range(3), 3, run_id=7))
        if streamed:
            assert list(strategy._round["exchange"].replies.values()) == [None, None, None]
        states[streamed] = checkpoint.load(tmp_path / str(streamed) / driver.CHECKPOINT)[0]
        records[streamed] = [json.loads(line) for line in
                             (tmp_path / str(streamed) / "metrics.jsonl").read_text().splitlines()][-1]
    assert records[True].get("streamed") is True and "streamed" not in records[False]
    for record in records.values():
        assert record["client_ids"] == ["client-0", "client-1"] and "NaN or Inf" in record["rejected"]["client-2"]
    assert records[True]["update_norms"] == records[False]["update_norms"]
    size = max(float(p.B.abs().max() * p.A.abs().max()) for p in states[False].lora.values())
    tol = 64 * 2 * EPS[torch.float32] * max(p.A.shape[1] for p in states[False].lora.values()) * max(size, 1e-3)
    for name, pair in states[False].lora.items():
        other = states[True].lora[name]
        assert float((other.B @ other.A - pair.B @ pair.A).abs().max()) <= tol, name


@pytest.mark.slow
def test_a_flower_round_of_100_light_nodes_streams(tmp_path, small_config):
    """100 nodes of the tiny model (one local step of one example each) on the in-process grid: one round that
    streams (100 ≥ ``STREAM_FROM``) accepts every reply and records per-client bytes for each."""
    from fedmomentum.flower.client_app import make_client_app
    from flower_helpers import LocalGrid, run_local

    config = small_config(tmp_path / "run", rounds=1, clients=100, clients_per_round=100, clip="none",
                          families=["basic_arithmetic"], train_per_family=100, local_steps=1, batch_size=1,
                          accuracy_per_family=0, partition="iid")
    run_local(config, LocalGrid(make_client_app(), range(100), 100, run_id=11))
    record = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["streamed"] is True and len(record["client_ids"]) == 100 and not record["rejected"]
    assert len(record["uplink_bytes_per_client"]) == 100 and len(record["update_norms"]) == 100
