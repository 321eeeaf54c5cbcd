"""Momentum, measured: how much of its direction the server's model keeps from round to round, from factors only.

An adapted layer's effective weight is ``W + s·B·A``; a round changes it by ``ΔW_t = D_t + s·B'A' − s·BA``
(``D_t`` the round's backbone delta, scaling folded in). Per round, with the adapted layers taken as one vector
(Frobenius inner products and norms summed over layers), and per layer:

- ``update_alignment``: ``cos(ΔW_t, ΔW_{t−1})``; absent (None) in the first round and when either change is zero;
- ``subspace_overlap``: the mean squared cosine of the principal angles between the column spaces of ``s·B·A``
  before and after the round (``‖U_beforeᵀ U_after‖²_F / min(r_before, r_after)``, the ranks numerical, ≤ r:
  1 = the same directions kept); the round's value is the mean over layers, a layer whose adapter is zero before
  or after (the first round from ``B = 0``, FLoRA's restart) left out;
- ``path_efficiency``: ``‖W_t − W_0‖ / Σ_{k≤t} ‖ΔW_k‖`` (1 = a straight path; ``W_0``: the model before round 1);
- ``noise_share``: ``‖Σp_iB_iA_i − B̄Ā‖ / ‖Σp_iB_iA_i‖`` (``B̄ = Σp_iB_i``, ``Ā = Σp_iA_i``): what averaging the
  clients' factors would lose, whatever the method does; absent where the clients' ranks differ;
- ``update_norm``: ``‖ΔW_t‖``, which says how far a direction above was moved.

No ``d×k`` matrix is formed. A change is kept as ``U·S`` and ``Vh`` at its numerical rank (``linalg.compress``), so
its norm is ``‖S‖`` and an inner product ``⟨L₁R₁, L₂R₂⟩ = Σ (L₁ᵀL₂) ⊙ (R₁R₂ᵀ)`` costs ``O((d+k) q₁q₂)``; the state
between rounds (``MomentumState``: the last change and ``W_t − W_0`` per layer, the path length) stays
``O((d+k)·rank)``. Everything is computed in float64 (the factors are exact in it), so the measures do not depend on
the precision the model or the aggregation works in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .linalg import ProductSVD, compress, lowrank_norm
from .types import LoraPair, LowRank, Tensor

MEASURES = ("update_alignment", "subspace_overlap", "path_efficiency", "noise_share", "update_norm")


@dataclass(frozen=True)
class MomentumState:
    """What the measures carry from one round to the next (``MomentumState()`` before round 1).

    ``previous``: the last round's ``ΔW`` per layer and ``total``: ``W_t − W_0`` per layer, both as ``U·S``, ``Vh``
    (float64); ``path``: ``Σ_k ‖ΔW_k‖`` over all layers as one vector, ``layer_path``: the same per layer.
    """

    previous: dict[str, LowRank] = field(default_factory=dict)
    total: dict[str, LowRank] = field(default_factory=dict)
    path: float = 0.0
    layer_path: dict[str, float] = field(default_factory=dict)

    def tensors(self) -> dict[str, Tensor]:
        """The state's matrices for a checkpoint: ``previous.L.<layer>``, ``previous.R.<layer>``, ``total.L.…``."""
        return {f"{part}.{side}.{name}": getattr(delta, attr).contiguous()
                for part in ("previous", "total") for name, delta in getattr(self, part).items()
                for side, attr in (("L", "left"), ("R", "right"))}

    def info(self) -> dict:
        """The state's numbers, JSON-able, for a checkpoint's metadata."""
        return {"path": self.path, "layer_path": dict(self.layer_path)}

    @classmethod
    def restore(cls, tensors: dict[str, Tensor], info: dict) -> MomentumState:
        """The state from ``tensors()`` and ``info()`` (of a checkpoint), checked: a ``ValueError`` names what is
        wrong."""
        parts: dict[str, dict[str, LowRank]] = {"previous": {}, "total": {}}
        for key in tensors:
            part, side, name = (key.split(".", 2) + ["", ""])[:3]
            if part not in parts or side not in ("L", "R") or not name:
                raise ValueError(f"momentum state: unexpected tensor {key!r}")
            if side == "L":
                left, right = tensors[key], tensors.get(f"{part}.R.{name}")
                if right is None:
                    raise ValueError(f"momentum state: {key!r} has no {part}.R.{name}")
                for label, x in ((key, left), (f"{part}.R.{name}", right)):
                    if not (isinstance(x, Tensor) and x.is_floating_point() and x.ndim == 2
                            and bool(torch.isfinite(x).all())):
                        raise ValueError(f"momentum state: {label!r} is not a finite matrix")
                if left.shape[1] != right.shape[0]:
                    raise ValueError(f"momentum state: {part} of {name!r} has factors {tuple(left.shape)} and "
                                     f"{tuple(right.shape)}")
                parts[part][name] = LowRank(left, right)
            elif f"{part}.L.{name}" not in tensors:
                raise ValueError(f"momentum state: {key!r} has no {part}.L.{name}")
        path, layer_path = info.get("path") if isinstance(info, dict) else None, (info or {}).get("layer_path")
        if not _length(path) or not isinstance(layer_path, dict) or not all(
                isinstance(k, str) and _length(v) for k, v in layer_path.items()):
            raise ValueError("momentum state: info must hold a path length ≥ 0 and one per layer")
        if set(layer_path) != set(parts["total"]) or not set(parts["previous"]) <= set(layer_path):
            raise ValueError("momentum state: its layers do not agree between the path lengths and the factors")
        return cls(parts["previous"], parts["total"], float(path), {k: float(v) for k, v in layer_path.items()})


def _length(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


@dataclass(frozen=True)
class Momentum:
    """One round's measures over all adapted layers (None where undefined, see the module's docstring) and per
    layer (``layers[name][measure]``)."""

    update_alignment: float | None
    subspace_overlap: float | None
    path_efficiency: float | None
    noise_share: float | None
    update_norm: float
    layers: dict[str, dict[str, float | None]]

    def record(self) -> dict[str, float | None]:
        """The fields for the round's ``metrics.jsonl`` line."""
        return {name: getattr(self, name) for name in MEASURES}


def measure(state: MomentumState, before: dict[str, LoraPair], after: dict[str, LoraPair],
            backbone: dict[str, LowRank], scaling: float, clients: Sequence[dict[str, LoraPair]] = (),
            weights: Sequence[float] = (), dtype: torch.dtype = torch.float64) -> tuple[Momentum, MomentumState]:
    """One round's ``Momentum`` and the state for the next round.

    ``before``/``after``: the global adapter at the start and at the end of the round; ``backbone``: the deltas the
    round applied to the backbone (scaling folded in; a layer without one is absent); ``scaling``: the adapter's
    ``s``; ``clients``/``weights``: the round's client factors and their weights ``p_i`` (for ``noise_share``;
    empty: not measured). ``dtype``: what the measures are computed in.
    """
    _check(state, before, after, backbone, scaling, clients, weights)
    layers: dict[str, dict[str, float | None]] = {}
    previous, total, layer_path = {}, {}, {}
    inner = squared = squared_before = squared_total = noise = whole = 0.0
    noise_layers = 0
    for name, old in before.items():
        new = after[name]
        change = _change(old, new, backbone.get(name), scaling, dtype)
        norm = float(change.left.norm())
        prior = state.previous.get(name)
        prior = None if prior is None else prior.to(change.left.device, dtype)
        dot = _inner(change, prior) if prior is not None else None
        prior_norm = float(prior.left.norm()) if prior is not None else 0.0
        total[name] = (compress(state.total[name].to(change.left.device, dtype) + change) if name in state.total
                       else change)
        layer_path[name] = state.layer_path.get(name, 0.0) + norm
        previous[name] = change
        gap = _noise(name, clients, weights, dtype) if clients else None
        layers[name] = {
            "update_alignment": _cosine(dot, norm, prior_norm),
            "subspace_overlap": _overlap(old, new, dtype),
            "path_efficiency": float(total[name].left.norm()) / layer_path[name] if layer_path[name] > 0 else None,
            "noise_share": gap[0] / gap[1] if gap is not None and gap[1] > 0 else None,
            "update_norm": norm,
        }
        squared += norm * norm
        squared_total += float(total[name].left.norm()) ** 2
        if dot is not None:
            inner += dot
            squared_before += prior_norm * prior_norm
        if gap is not None:
            noise, whole, noise_layers = noise + gap[0] ** 2, whole + gap[1] ** 2, noise_layers + 1
    path = state.path + math.sqrt(squared)
    overlaps = [v["subspace_overlap"] for v in layers.values() if v["subspace_overlap"] is not None]
    result = Momentum(
        update_alignment=_cosine(inner, math.sqrt(squared), math.sqrt(squared_before)) if state.previous else None,
        subspace_overlap=sum(overlaps) / len(overlaps) if overlaps else None,
        path_efficiency=math.sqrt(squared_total) / path if path > 0 else None,
        noise_share=math.sqrt(noise / whole) if noise_layers == len(before) and whole > 0 else None,
        update_norm=math.sqrt(squared),
        layers=layers,
    )
    return result, MomentumState(previous, total, path, layer_path)


def noise_share(clients: Sequence[LoraPair], weights: Sequence[float], dtype: torch.dtype = torch.float64) -> float:
    """``‖Σp_iB_iA_i − B̄Ā‖ / ‖Σp_iB_iA_i‖`` of one layer (NaN when the aggregate is zero); a ``ValueError`` when
    the clients' ranks differ (their factors cannot be averaged)."""
    gap = _noise("layer", [{"layer": pair} for pair in clients], weights, dtype)
    if gap is None:
        raise ValueError(f"noise_share: the clients' ranks differ ({sorted({p.rank for p in clients})}); their "
                         "factors cannot be averaged")
    return gap[0] / gap[1] if gap[1] > 0 else math.nan


# --- the pieces ---------------------------------------------------------------------------------------------------

def _change(before: LoraPair, after: LoraPair, delta: LowRank | None, scaling: float, dtype: torch.dtype) -> LowRank:
    """``ΔW = D + s·B'A' − s·BA`` as ``U·S``, ``Vh`` at its numerical rank (rank 0 when nothing changed)."""
    device = after.B.device
    lefts = [scaling * after.B.to(device, dtype), -scaling * before.B.to(device, dtype)]
    rights = [after.A.to(device, dtype), before.A.to(device, dtype)]
    if delta is not None:
        lefts.append(delta.left.to(device, dtype))
        rights.append(delta.right.to(device, dtype))
    return compress(LowRank(torch.cat(lefts, 1), torch.cat(rights, 0)))


def _inner(x: LowRank, y: LowRank) -> float:
    """``⟨x, y⟩_F`` of two low-rank matrices from their factors' small cross products."""
    return float(((x.left.mT @ y.left) * (x.right @ y.right.mT)).sum())


def _cosine(dot: float | None, norm: float, other: float) -> float | None:
    if dot is None or norm == 0 or other == 0:
        return None
    return max(-1.0, min(1.0, dot / (norm * other)))


def _column_space(pair: LoraPair, dtype: torch.dtype) -> Tensor:
    """An orthonormal basis of the column space of ``B·A``, at its numerical rank judged at the precision the factors
    are held in (numpy's ``matrix_rank`` rule): a direction below the factors' own round-off is not one."""
    svd = ProductSVD(pair.B.to(dtype), pair.A.to(dtype))
    S = svd.S_cpu
    if S.numel() == 0 or S[0] <= 0:
        return pair.B.new_zeros(pair.B.shape[0], 0, dtype=dtype)
    keep = int((S > S[0] * max(pair.shape) * torch.finfo(pair.B.dtype).eps).sum())
    return svd.U(keep)


def _overlap(before: LoraPair, after: LoraPair, dtype: torch.dtype) -> float | None:
    """Mean ``cos²`` of the principal angles between the column spaces of ``B·A`` and ``B'·A'`` (the scaling ``s``
    does not move them); None when either adapter is zero."""
    U, V = _column_space(before, dtype), _column_space(after, dtype).to(before.B.device)
    if U.shape[1] == 0 or V.shape[1] == 0:
        return None
    return min(1.0, float((U.mT @ V).square().sum()) / min(U.shape[1], V.shape[1]))


def _noise(name: str, clients: Sequence[dict[str, LoraPair]], weights: Sequence[float],
           dtype: torch.dtype) -> tuple[float, float] | None:
    """``(‖Σp_iB_iA_i − B̄Ā‖, ‖Σp_iB_iA_i‖)`` of layer ``name``; None when the clients' ranks differ."""
    pairs = [c[name] for c in clients]
    if len({p.rank for p in pairs}) > 1:
        return None
    device = pairs[0].B.device
    Bs = [float(p) * c.B.to(device, dtype) for p, c in zip(weights, pairs, strict=True)]
    As = [c.A.to(device, dtype) for c in pairs]
    B_mean, A_mean = sum(Bs), sum(float(p) * A for p, A in zip(weights, As, strict=True))
    whole = lowrank_norm(torch.cat(Bs, 1), torch.cat(As, 0))
    gap = lowrank_norm(torch.cat(Bs + [-B_mean], 1), torch.cat(As + [A_mean], 0))
    return gap, whole


def _check(state: MomentumState, before: dict[str, LoraPair], after: dict[str, LoraPair],
           backbone: dict[str, LowRank], scaling: float, clients: Sequence[dict[str, LoraPair]],
           weights: Sequence[float]) -> None:
    """One ``ValueError`` line naming what does not fit."""
    if isinstance(scaling, bool) or not isinstance(scaling, int | float) or not math.isfinite(scaling):
        raise ValueError(f"momentum: scaling must be a finite number, got {scaling!r}")
    if not before or set(before) != set(after):
        raise ValueError(f"momentum: the adapter before and after the round must have the same layers "
                         f"(only before: {sorted(set(before) - set(after))[:3]}, "
                         f"only after: {sorted(set(after) - set(before))[:3]})")
    for name, old in before.items():
        if old.shape != after[name].shape:
            raise ValueError(f"momentum: layer {name!r} is {old.shape} before the round and {after[name].shape} after")
        if name in backbone and backbone[name].shape != old.shape:
            raise ValueError(f"momentum: layer {name!r}: backbone delta {backbone[name].shape} does not fit "
                             f"{old.shape}")
    unknown = sorted(set(backbone) - set(before))
    if unknown:
        raise ValueError(f"momentum: backbone deltas for layers the adapter does not have: {unknown[:3]}")
    if state.total and set(state.total) != set(before):
        raise ValueError("momentum: the adapter's layers differ from the previous rounds' "
                         f"(new: {sorted(set(before) - set(state.total))[:3]}, "
                         f"gone: {sorted(set(state.total) - set(before))[:3]})")
    if len(clients) != len(weights):
        raise ValueError(f"momentum: {len(clients)} clients but {len(weights)} weights")
    if not all(isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p) and p >= 0
               for p in weights):
        raise ValueError(f"momentum: client weights must be finite numbers ≥ 0, got {list(weights)}")
    for index, factors in enumerate(clients):
        if set(factors) != set(before):
            raise ValueError(f"momentum: client {index}'s layers differ from the adapter's")
        for name, pair in factors.items():
            if pair.shape != before[name].shape:
                raise ValueError(f"momentum: client {index}, layer {name!r}: {pair.shape} does not fit "
                                 f"{before[name].shape}")
