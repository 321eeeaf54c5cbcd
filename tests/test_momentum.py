"""Momentum measured from factors (``fedmomentum.momentum``) against dense float64 references (numpy, scipy), over
rounds of random factors and of real methods, the edge cases (first round, zero change, rank below r, zero adapter,
mixed ranks), the state's checkpoint round trip, and end to end on the tiny model against its own weights.

Tolerances: the module works in float64 on float32 factors, so it and the dense reference differ by float64 round-off
of backward-stable QR/SVDs: ``≲ c·n·ε₆₄`` relative to the factors' size (``‖L‖·‖R‖``), i.e. ``c·n·ε₆₄·κ`` on a
cosine or ratio whose matrices are ``κ`` times smaller than their factors (``c·n ≤ 10³·max(d, k)`` here), and
``/ gap`` on a subspace (``σ₁/σ_r``).
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

import fedmomentum as fm
from fedmomentum.momentum import Momentum, MomentumState, measure, noise_share
from fedmomentum.types import ClientUpdate, LoraPair, LowRank

EPS64, EPS32 = float(np.finfo(np.float64).eps), float(np.finfo(np.float32).eps)
SHAPES = {"q": (24, 40), "v": (16, 40), "o": (40, 24)}
RANK, SCALING = 4, 2.0


def tol(kappa: float, size: int = 40) -> float:
    return 1e3 * size * EPS64 * kappa


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def dense(pair: LoraPair) -> np.ndarray:
    return np64(pair.B) @ np64(pair.A)


def dense_delta(delta: LowRank | None, shape) -> np.ndarray:
    return np.zeros(shape) if delta is None else np64(delta.left) @ np64(delta.right)


def factor_size(pairs, deltas=()) -> float:
    """``Σ ‖B‖‖A‖`` (times the weights) of what makes up a matrix: the scale of its round-off."""
    return sum(abs(w) * float(p.B.norm() * p.A.norm()) for w, p in pairs) + sum(
        float(d.left.norm() * d.right.norm()) for d in deltas)


def basis(M: np.ndarray, eps: float) -> np.ndarray:
    """An orthonormal basis of ``M``'s column space at numpy's rank rule for precision ``eps``."""
    return scipy.linalg.orth(M, rcond=max(M.shape) * eps) if np.abs(M).max() > 0 else np.zeros((M.shape[0], 0))


def overlap_reference(before: LoraPair, after: LoraPair) -> tuple[float | None, float]:
    """Mean cos² of the principal angles (scipy) and the tolerance from the spectra's gaps."""
    U, V = basis(SCALING * dense(before), EPS32), basis(SCALING * dense(after), EPS32)
    if U.shape[1] == 0 or V.shape[1] == 0:
        return None, 0.0
    gap = max(np.linalg.svd(M, compute_uv=False)[0] / np.linalg.svd(M, compute_uv=False)[B.shape[1] - 1]
              for M, B in ((dense(before), U), (dense(after), V)))
    return float(np.mean(np.cos(scipy.linalg.subspace_angles(U, V)) ** 2)), tol(gap)


def random_pair(shape, generator, scale=1.0, rank=RANK) -> LoraPair:
    d, k = shape
    A, B = torch.randn(rank, k, generator=generator), torch.randn(d, rank, generator=generator)
    return LoraPair(scale * A, scale * B)


def cosine(x: list[np.ndarray], y: list[np.ndarray]) -> float:
    a, b = np.concatenate([m.ravel() for m in x]), np.concatenate([m.ravel() for m in y])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def norm(x: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(m * m)) for m in x))


class Reference:
    """The measures from dense ``d×k`` float64 matrices, round by round."""

    def __init__(self):
        self.changes: list[dict[str, np.ndarray]] = []

    def round(self, before, after, backbone, clients, weights) -> dict:
        change = {n: SCALING * (dense(after[n]) - dense(before[n])) + dense_delta(backbone.get(n), SHAPES[n])
                  for n in before}
        self.changes.append(change)
        total = {n: sum(c[n] for c in self.changes) for n in before}
        path = sum(norm(list(c.values())) for c in self.changes)
        prior = self.changes[-2] if len(self.changes) > 1 else None
        out = {"update_norm": norm(list(change.values())),
               "path_efficiency": norm(list(total.values())) / path,
               "update_alignment": cosine(list(change.values()), list(prior.values())) if prior else None,
               "layers": {}}
        gaps, wholes = [], []
        for n in before:
            exact = sum(p * dense(c[n]) for p, c in zip(weights, clients, strict=True))
            averaged = sum(p * np64(c[n].B) for p, c in zip(weights, clients, strict=True)) @ sum(
                p * np64(c[n].A) for p, c in zip(weights, clients, strict=True))
            gaps.append(exact - averaged)
            wholes.append(exact)
            layer_path = sum(float(np.linalg.norm(c[n])) for c in self.changes)
            out["layers"][n] = {
                "update_norm": float(np.linalg.norm(change[n])),
                "update_alignment": cosine([change[n]], [prior[n]]) if prior else None,
                "path_efficiency": float(np.linalg.norm(total[n])) / layer_path,
                "noise_share": float(np.linalg.norm(gaps[-1]) / np.linalg.norm(exact)),
                "subspace_overlap": overlap_reference(before[n], after[n]),
            }
        out["noise_share"] = norm(gaps) / norm(wholes)
        overlaps = [v["subspace_overlap"][0] for v in out["layers"].values() if v["subspace_overlap"][0] is not None]
        out["subspace_overlap"] = sum(overlaps) / len(overlaps) if overlaps else None
        return out


def kappa(before, after, backbone, value: float) -> float:
    """How much smaller than its factors a round's change is (``κ`` of the tolerances)."""
    size = sum(SCALING * factor_size([(1, before[n]), (1, after[n])], [backbone[n]] if n in backbone else [])
               for n in before)
    return size / value if value > 0 else math.inf


def check(got: Momentum, want: dict, before, after, backbone, clients, weights) -> None:
    k = kappa(before, after, backbone, want["update_norm"])
    assert got.update_norm == pytest.approx(want["update_norm"], rel=tol(k))
    for key in ("update_alignment", "path_efficiency"):
        if want[key] is None:
            assert getattr(got, key) is None
        else:  # a cosine / ratio: the relative error of its matrices, ≲ tol(κ), moves it by at most about twice that
            assert getattr(got, key) == pytest.approx(want[key], abs=tol(k) * 4), key
    noise_k = sum(factor_size([(p, c[n]) for p, c in zip(weights, clients, strict=True)]) for n in before)
    assert got.noise_share == pytest.approx(want["noise_share"], abs=tol(noise_k / norm(
        [sum(p * dense(c[n]) for p, c in zip(weights, clients, strict=True)) for n in before])) * 4)
    for n, values in got.layers.items():
        expected = want["layers"][n]
        overlap, overlap_tol = expected["subspace_overlap"]
        assert (values["subspace_overlap"] is None) == (overlap is None)
        if overlap is not None:
            assert values["subspace_overlap"] == pytest.approx(overlap, abs=overlap_tol)
        layer_k = kappa({n: before[n]}, {n: after[n]}, backbone, expected["update_norm"])
        if expected["update_alignment"] is not None:
            assert values["update_alignment"] == pytest.approx(expected["update_alignment"], abs=tol(layer_k) * 4)
        assert values["path_efficiency"] == pytest.approx(expected["path_efficiency"], abs=tol(layer_k) * 4)
    if want["subspace_overlap"] is not None:
        assert got.subspace_overlap == pytest.approx(want["subspace_overlap"], abs=max(
            v["subspace_overlap"][1] for v in want["layers"].values()))


def drifting_rounds(generator, rounds=5):
    """Rounds of a model that keeps part of its direction: each round's adapter moves along a fixed direction plus
    noise, some layers take a backbone delta, one layer's ``B`` loses a column in round 2; the clients scatter around
    the new adapter."""
    adapter = {n: random_pair(s, generator) for n, s in SHAPES.items()}
    push = {n: random_pair(s, generator, 0.5) for n, s in SHAPES.items()}
    for t in range(rounds):
        new = {n: LoraPair(p.A + push[n].A + 0.3 * torch.randn(p.A.shape, generator=generator),
                           p.B + push[n].B + 0.3 * torch.randn(p.B.shape, generator=generator))
               for n, p in adapter.items()}
        if t == 2:
            new["v"] = LoraPair(new["v"].A, torch.cat([new["v"].B[:, :-1], torch.zeros(16, 1)], 1))
        backbone = {n: LowRank(torch.randn(s[0], 3, generator=generator), torch.randn(3, s[1], generator=generator))
                    for n, s in SHAPES.items() if (t + len(n)) % 2}
        clients = [{n: LoraPair(p.A + torch.randn(p.A.shape, generator=generator),
                                p.B + torch.randn(p.B.shape, generator=generator)) for n, p in new.items()}
                   for _ in range(3)]
        yield adapter, new, backbone, clients, [0.5, 0.3, 0.2]
        adapter = new


def test_measures_match_dense_references_round_by_round():
    generator = torch.Generator().manual_seed(0)
    state, reference = MomentumState(), Reference()
    seen = []
    for before, after, backbone, clients, weights in drifting_rounds(generator):
        got, state = measure(state, before, after, backbone, SCALING, clients, weights)
        check(got, reference.round(before, after, backbone, clients, weights), before, after, backbone, clients,
              weights)
        seen.append(got)
    assert seen[0].update_alignment is None and all(g.update_alignment is not None for g in seen[1:])
    assert all(0.2 < g.update_alignment < 1 for g in seen[1:])  # the drift is seen: these are not ~0 by chance
    assert seen[2].layers["v"]["subspace_overlap"] is not None  # B with a zero column: rank 3 against rank 4
    assert all(set(g.layers) == set(SHAPES) for g in seen)
    assert json.loads(json.dumps(seen[0].record())) == seen[0].record()


@pytest.mark.parametrize("name", ["fedit", "fedmomentum", "flora", "fedex-lora", "ffa-lora"])
def test_measures_of_real_methods_match_dense_references(name):
    """Each round of a method: the global adapter and backbone deltas it returns, measured against dense references;
    for an exact method the change is ``s(Σp_iB_iA_i − BA)``; FedIT's noise share is its own noise_norm over
    ``‖sΣp_iB_iA_i‖``; FFA-LoRA (A frozen, the same on every client) loses nothing by averaging."""
    generator = torch.Generator().manual_seed(1)
    method = fm.methods.create(name)
    adapter = {n: LoraPair(torch.randn(RANK, s[1], generator=generator) / math.sqrt(s[1]), torch.zeros(s[0], RANK))
               for n, s in SHAPES.items()}
    state, reference, push = MomentumState(), Reference(), {n: torch.randn(s[0], RANK, generator=generator)
                                                             for n, s in SHAPES.items()}
    for t in range(1, 5):
        trains = method.trainable(t)
        updates = [ClientUpdate({n: LoraPair(p.A + trains["A"] * 0.1 * torch.randn(p.A.shape, generator=generator),
                                             p.B + trains["B"] * (0.1 * push[n]
                                                                  + 0.05 * torch.randn(p.B.shape, generator=generator)))
                                 for n, p in adapter.items()}, num_examples=10 + 5 * i, client_id=str(i))
                   for i in range(3)]
        result = method.aggregate(adapter, updates, scaling=SCALING, t=t)
        clients, weights = [u.factors for u in updates], method.client_weights(updates)
        got, state = measure(state, adapter, result.lora, result.backbone, SCALING, clients, weights)
        want = reference.round(adapter, result.lora, result.backbone, clients, weights)
        check(got, want, adapter, result.lora, result.backbone, clients, weights)
        if name in ("fedmomentum", "flora", "fedex-lora"):
            for n in adapter:
                exact = SCALING * (sum(p * dense(c[n]) for p, c in zip(weights, clients, strict=True))
                                   - dense(adapter[n]))
                assert np.linalg.norm(reference.changes[-1][n] - exact) <= 1e3 * EPS32 * np.linalg.norm(exact)
        if name == "fedit":
            for n, values in got.layers.items():  # the method works in float32: its noise_norm errs by ≲ ε₃₂·size
                whole = SCALING * np.linalg.norm(sum(p * dense(c[n]) for p, c in zip(weights, clients, strict=True)))
                size = SCALING * factor_size([(p, c[n]) for p, c in zip(weights, clients, strict=True)]
                                             + [(1, result.lora[n])])
                assert values["noise_share"] == pytest.approx(result.stats["layers"][n]["noise_norm"] / whole,
                                                              abs=1e3 * EPS32 * size / whole)
        if name == "ffa-lora":
            assert got.noise_share <= tol(10)
        if t == 0:  # from B = 0: no subspace before the first round
            assert got.subspace_overlap is None and got.update_alignment is None
        adapter = result.lora
    if name == "flora":  # the adapter restarts from B = 0 every round: never a subspace to keep
        assert got.subspace_overlap is None
    else:
        assert got.subspace_overlap is not None and got.update_alignment is not None


def test_first_round_and_zero_changes():
    generator = torch.Generator().manual_seed(2)
    adapter = {n: random_pair(s, generator) for n, s in SHAPES.items()}
    got, state = measure(MomentumState(), adapter, adapter, {}, SCALING)
    assert got.update_norm == 0 and got.update_alignment is None and got.path_efficiency is None
    assert all(v["update_norm"] == 0 and v["path_efficiency"] is None for v in got.layers.values())
    assert got.subspace_overlap == pytest.approx(1.0, abs=tol(10)) and got.noise_share is None  # no clients given
    assert all(delta.rank == 0 for delta in state.total.values())

    moved = {n: random_pair(s, generator) for n, s in SHAPES.items()}
    got, state = measure(state, adapter, moved, {}, SCALING)
    assert got.update_alignment is None  # the previous change was zero: no direction to compare with
    assert got.path_efficiency == pytest.approx(1.0, abs=tol(10))  # one step is a straight path
    got, state = measure(state, moved, moved, {}, SCALING)
    assert got.update_norm == 0 and got.update_alignment is None
    assert got.path_efficiency == pytest.approx(1.0, abs=tol(10))
    back, state = measure(state, moved, adapter, {}, SCALING)  # straight back: no net change, the path is 2 steps
    assert back.path_efficiency == pytest.approx(0.0, abs=tol(100)) and back.update_alignment is None


def test_a_change_that_is_only_a_backbone_delta_and_one_that_reverses():
    """The adapter kept, the backbone moved: the change is the delta; the next round's opposite delta has
    alignment −1; a zero layer beside changed ones leaves the round's values defined."""
    generator = torch.Generator().manual_seed(3)
    adapter = {n: random_pair(s, generator) for n, s in SHAPES.items()}
    delta = LowRank(torch.randn(24, 2, generator=generator), torch.randn(2, 40, generator=generator))
    got, state = measure(MomentumState(), adapter, adapter, {"q": delta}, SCALING)
    assert got.update_norm == pytest.approx(np.linalg.norm(dense_delta(delta, (24, 40))), rel=tol(10))
    assert got.layers["v"]["update_norm"] == 0
    got, state = measure(state, adapter, adapter, {"q": LowRank(-delta.left, delta.right)}, SCALING)
    assert got.update_alignment == pytest.approx(-1.0, abs=tol(10))
    assert got.layers["q"]["update_alignment"] == pytest.approx(-1.0, abs=tol(10))
    assert got.layers["v"]["update_alignment"] is None and got.layers["v"]["path_efficiency"] is None


@pytest.mark.parametrize("case", ["zero column", "equal columns", "float32 product of rank 3", "zero adapter"])
def test_subspace_overlap_of_a_layer_below_rank_r(case):
    generator = torch.Generator().manual_seed(4)
    before, after = random_pair((24, 40), generator), random_pair((24, 40), generator)
    B = before.B.clone()
    if case == "zero column":
        B[:, -1] = 0
    elif case == "equal columns":
        B[:, 1] = B[:, 0]  # B·A = b₀(a₀ + a₁) + …: rank 3, exactly
    elif case == "float32 product of rank 3":  # rank 4 in float64 only through float32 round-off (σ₄ ~ ε₃₂ σ₁)
        B = B[:, :3] @ torch.randn(3, RANK, generator=generator)
    else:
        B.zero_()
    before = LoraPair(before.A, B)
    after = LoraPair(after.A, torch.cat([B[:, :2], after.B[:, 2:]], 1))  # keeps part of the old directions
    got, _ = measure(MomentumState(), {"q": before}, {"q": after}, {}, SCALING)
    want, limit = overlap_reference(before, after)
    if case == "zero adapter":
        assert want is None and got.subspace_overlap is None and got.layers["q"]["subspace_overlap"] is None
        return
    assert basis(dense(before), EPS32).shape[1] == 3
    assert got.subspace_overlap == pytest.approx(want, abs=limit) and 0.3 < want < 1


def test_noise_share():
    generator = torch.Generator().manual_seed(5)
    pairs = [random_pair((24, 40), generator) for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    exact = sum(p * dense(c) for p, c in zip(weights, pairs, strict=True))
    averaged = sum(p * np64(c.B) for p, c in zip(weights, pairs, strict=True)) @ sum(
        p * np64(c.A) for p, c in zip(weights, pairs, strict=True))
    k = factor_size(list(zip(weights, pairs, strict=True))) / np.linalg.norm(exact)
    assert noise_share(pairs, weights) == pytest.approx(np.linalg.norm(exact - averaged) / np.linalg.norm(exact),
                                                        abs=tol(k))
    same_A = [LoraPair(pairs[0].A, c.B) for c in pairs]  # FFA-LoRA: averaging the factors is exact
    assert noise_share(same_A, weights) <= tol(k)
    assert math.isnan(noise_share([LoraPair(c.A, torch.zeros_like(c.B)) for c in pairs], weights))
    mixed = [pairs[0], random_pair((24, 40), generator, rank=2)]
    with pytest.raises(ValueError, match=r"the clients' ranks differ \(\[2, 4\]\)"):
        noise_share(mixed, [0.5, 0.5])
    adapter = {"q": pairs[0]}
    got, _ = measure(MomentumState(), adapter, adapter, {}, SCALING, [{"q": c} for c in mixed], [0.5, 0.5])
    assert got.noise_share is None and got.layers["q"]["noise_share"] is None


def test_the_state_survives_a_checkpoint():
    from safetensors.torch import load, save

    generator = torch.Generator().manual_seed(6)
    rounds = list(drifting_rounds(generator, 3))
    state = MomentumState()
    for before, after, backbone, clients, weights in rounds[:2]:
        _, state = measure(state, before, after, backbone, SCALING, clients, weights)
    restored = MomentumState.restore(load(save(state.tensors())), json.loads(json.dumps(state.info())))
    last = rounds[2]
    assert measure(restored, *last[:3], SCALING, *last[3:])[0] == measure(state, *last[:3], SCALING, *last[3:])[0]

    tensors, info = state.tensors(), state.info()
    bad = [({k: v for k, v in tensors.items() if k != "total.R.q"}, info, "has no total.R.q"),
           ({**tensors, "total.L.q": tensors["total.L.q"] * math.nan}, info, "'total.L.q' is not a finite matrix"),
           ({**tensors, "total.L.q": tensors["total.L.q"][:, :1]}, info, "total of 'q' has factors"),
           ({**tensors, "extra.L.q": tensors["total.L.q"]}, info, "unexpected tensor 'extra.L.q'"),
           (tensors, {**info, "path": -1.0}, "a path length ≥ 0"),
           (tensors, {**info, "layer_path": {"q": 1.0}}, "its layers do not agree")]
    for tensors_, info_, message in bad:
        with pytest.raises(ValueError, match=message):
            MomentumState.restore(tensors_, info_)


@pytest.mark.parametrize("change, message", [
    (lambda b, a, d, c, w: (b, {**a, "x": a["q"]}, d, c, w), "must have the same layers"),
    (lambda b, a, d, c, w: (b, {**a, "q": a["v"]}, d, c, w), "layer 'q' is (24, 40) before the round and (16, 40)"),
    (lambda b, a, d, c, w: (b, a, {"x": next(iter(d.values()))}, c, w), "backbone deltas for layers"),
    (lambda b, a, d, c, w: (b, a, {"q": LowRank(torch.ones(3, 1), torch.ones(1, 3))}, c, w),
     "backbone delta (3, 3) does not fit"),
    (lambda b, a, d, c, w: (b, a, d, c, w[:2]), "3 clients but 2 weights"),
    (lambda b, a, d, c, w: (b, a, d, c, [math.nan, 0.5, 0.5]), "client weights must be finite"),
    (lambda b, a, d, c, w: (b, a, d, [{**c[0], "q": c[0]["v"]}] + c[1:], w), "client 0, layer 'q'"),
])
def test_bad_input_is_one_clear_error(change, message):
    before, after, backbone, clients, weights = next(drifting_rounds(torch.Generator().manual_seed(7), 2))
    before, after, backbone, clients, weights = change(before, after, backbone, clients, weights)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        measure(MomentumState(), before, after, backbone, SCALING, clients, weights)
    _, state = measure(MomentumState(), *next(drifting_rounds(torch.Generator().manual_seed(7), 2))[:3], SCALING)
    with pytest.raises(ValueError, match="the adapter's layers differ from the previous rounds'"):
        measure(state, {"q": before["q"]}, {"q": before["q"]}, {}, SCALING)


# --- end to end on the tiny model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fedmomentum", "fedit"])
def test_measured_in_a_run_matches_the_models_own_weights(tmp_path, tiny_model, small_config, method):
    """A run of the tiny model, whose driver takes the measures each round: the round's
    change, alignment and path efficiency equal those of the model's own dense effective weights ``W + s·B·A`` read
    before and after every round, up to the float32 rounding of adding a delta to ``W`` in place; the fields are in
    ``metrics.jsonl`` and, per layer, in ``aggregation.jsonl``."""
    from fedmomentum import driver, simulation
    from fedmomentum.peft_io import get_backbone, get_lora

    class Snapshots(simulation.InProcess):
        def __init__(self, *args):
            super().__init__(*args)
            self.weights, self.bounds = [], []

        def effective(self):
            lora, backbone = get_lora(self.setup.model), get_backbone(self.setup.model)
            return {n: np64(backbone[n]) + self.setup.scaling * dense(lora[n]) for n in lora}, backbone

        def train_round(self, t, state, trainable, lr):
            if not self.weights:
                self.weights.append(self.effective()[0])
            return super().train_round(t, state, trainable, lr)

        def after_round(self, t, previous, result, record, out):
            weights, backbone = self.effective()
            self.weights.append(weights)
            # W += L @ R in float32, in place: ≤ ε₃₂ (‖W‖ + q‖L‖‖R‖) off the exact sum, per layer
            self.bounds.append(math.sqrt(sum(
                (EPS32 * (float(backbone[n].norm()) + d.rank * float(d.left.norm() * d.right.norm()))) ** 2
                for n, d in result.backbone.items())))

    config = small_config(tmp_path / "run", method=method, rounds=3)
    setup, plain = simulation.engine(config, copy.deepcopy(tiny_model[0]), tiny_model[1])
    engine = Snapshots(setup, plain.client_data, plain.ids)
    driver.run(setup, engine, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    changes = [{n: after[n] - before[n] for n in after} for before, after in zip(engine.weights, engine.weights[1:],
                                                                                  strict=False)]
    norms = [norm(list(c.values())) for c in changes]
    relative = [b / n for b, n in zip(engine.bounds, norms, strict=True)]
    assert max(relative) < 1e-2  # the changes are far above the rounding: the comparison below says something
    for t, row in enumerate(rows):
        assert row["update_norm"] == pytest.approx(norms[t], rel=2 * relative[t] + tol(10))
        if t == 0:
            assert row["update_alignment"] is None
        else:
            want = cosine(list(changes[t].values()), list(changes[t - 1].values()))
            assert row["update_alignment"] == pytest.approx(want, abs=4 * (relative[t] + relative[t - 1]) + tol(10))
        total = norm([engine.weights[t + 1][n] - engine.weights[0][n] for n in changes[0]])
        slack = sum(engine.bounds[: t + 1])
        assert row["path_efficiency"] == pytest.approx(total / sum(norms[: t + 1]),
                                                       abs=4 * slack / min(total, sum(norms[: t + 1])) + tol(10))
        assert 0 <= row["noise_share"] < 1 and (row["subspace_overlap"] is None) == (t == 0)
    layers = [json.loads(line) for line in (tmp_path / "run" / "aggregation.jsonl").read_text().splitlines()]
    assert [row["round"] for row in layers] == [1, 2, 3]
    assert all(set(values) >= {"update_alignment", "subspace_overlap", "path_efficiency", "noise_share",
                               "update_norm"} for row in layers for values in row["layers"].values())
