"""A round whose updates arrive one at a time (``Method.open_round``): ``fold`` each update as it arrives, then
``finish`` for the round's ``Aggregate``.

- ``StreamedRound``: each update is checked (``Method.validate_update``) and folded into running sums, per layer,
  then dropped: the server's memory does not grow with the number of clients. What is kept is what the method
  declares (``Method.stream_sums``): the sums of the averaged factors (``linalg.FactorSum``: FedIT, FFA-LoRA,
  RoLoRA, FedSA-LoRA, FedEx-LoRA), and ``Σ w_i B_i A_i`` for the SVD methods (``linalg.ProductSum``: exact, its
  factors while they take less room than the ``d×k`` matrix, then that matrix; ``linalg.ProductSketch`` when the
  method's ``svd`` is ``sketch``: ``O((d + k) ℓ)``, its estimated error recorded as ``svd_error``). ``finish``
  hands each layer the averaged factors (as one client of weight 1) and the sum's SVD to the method's own
  ``aggregate_layer``, so the result is ``aggregate``'s on the same updates: equal to round-off on the exact
  routes (the weights ``n_i`` are summed as they come and divided by ``Σ n_i`` at the end), within the recorded
  error for the sketch.
- ``CollectedRound``: the updates are checked and kept, and ``finish`` is ``Method.aggregate`` on them (the same
  result, exactly). For the methods that need every update at once (FRLoRA, a ``randomized`` SVD route).
"""

from __future__ import annotations

import torch

from ..linalg import FactorSum, ProductSketch, ProductSum, SketchOptions
from ..types import Aggregate, ClientUpdate, LoraPair, StateDict, UpdateError
from .base import Method, _by_layer, _rescaled


def sketch_width(d: int, k: int, rank: int) -> int:
    """The one-pass sketch's width for a streamed round: four times the two-pass sketch's first block for the
    global rank (``2r + oversample``), at most ``min(d, k)``."""
    return min(d, k, 4 * SketchOptions().first_width(rank))


class CollectedRound:
    """Updates checked as they arrive and kept; ``finish`` aggregates them all at once."""

    streamed = False

    def __init__(self, method: Method, global_lora: dict[str, LoraPair], *, scaling: float, t: int = 1,
                 state: StateDict | None = None):
        method.check_round(scaling, t)
        method.validate_adapter(global_lora)
        self.method, self.global_lora, self.scaling, self.t, self.state = method, global_lora, scaling, t, state
        self.count = 0
        self.updates: list[ClientUpdate] = []

    def fold(self, update: ClientUpdate) -> None:
        """Check ``update`` (``UpdateError`` naming the client and layer) and take it into the round."""
        self.method.validate_update(self.global_lora, update, self.count, self.scaling)
        self._add(update)
        self.count += 1

    def _add(self, update: ClientUpdate) -> None:
        self.updates.append(update)

    def finish(self) -> Aggregate:
        """The round's aggregate (``Method.aggregate``'s result on the updates folded in)."""
        if not self.count:
            raise UpdateError(f"{self.method.name}: no client updates to aggregate")
        return self.method.aggregate(self.global_lora, self.updates, scaling=self.scaling, t=self.t,
                                     state=self.state)

    @property
    def nbytes(self) -> int:
        """The memory the round holds of the updates."""
        return sum(X.numel() * X.element_size() for u in self.updates for p in u.factors.values() for X in (p.A, p.B))


class StreamedRound(CollectedRound):
    """Updates folded into running sums per layer as they arrive (see the module notes)."""

    streamed = True

    def __init__(self, method: Method, global_lora: dict[str, LoraPair], *, scaling: float, t: int = 1,
                 state: StateDict | None = None):
        super().__init__(method, global_lora, scaling=scaling, t=t, state=state)
        self.layer_states = _by_layer(state or {}, global_lora, method.dtype)
        self.pairs = {name: pair.to(method.dtype) for name, pair in global_lora.items()}
        kinds = method.stream_sums(t)
        if kinds is None:
            raise ValueError(f"{method.name} cannot stream its rounds (it needs every update at once)")
        self.sums = {name: self._open(pair, kinds) for name, pair in self.pairs.items()}
        self.weight = 0.0
        self.uplink: dict[str, int] = {}

    def _open(self, pair: LoraPair, kinds: frozenset[str]) -> dict:
        method, shape = self.method, pair.shape
        sums: dict = {factor: FactorSum() for factor in ("A", "B") if factor in kinds}
        if "noise" in kinds:
            sums["noise"] = ProductSum(shape, dtype=method.dtype)
        if "product" in kinds:
            sums["product"] = (ProductSketch(shape, sketch_width(*shape, pair.rank), seed=method.seed,
                                             dtype=method.dtype, device=pair.A.device)
                               if method.svd == "sketch" else ProductSum(shape, dtype=method.dtype))
        return sums

    def _add(self, update: ClientUpdate) -> None:
        method = self.method
        weight = 1.0 if method.weighting == "uniform" else float(update.num_examples)
        ratio = 1.0 if update.scaling is None else float(update.scaling) / self.scaling
        for name, sums in self.sums.items():
            pair = _rescaled(update.factors[name].to(method.dtype), ratio)
            for factor in ("A", "B"):
                if factor in sums:
                    sums[factor].fold(_padded(pair, self.pairs[name].rank, factor), weight)
            for kind in ("product", "noise"):
                if kind in sums:
                    sums[kind].fold(pair.B, pair.A, weight)
        self.weight += weight
        self.uplink[update.client_id or str(self.count)] = method.uplink_bytes(update, self.t)

    def finish(self) -> Aggregate:
        """The round's aggregate from the sums, layer by layer (each layer's sums are dropped once it is done)."""
        method, scaling, t = self.method, self.scaling, self.t
        if not self.count:
            raise UpdateError(f"{method.name}: no client updates to aggregate")
        lora, backbone, per_layer, new_state = {}, {}, {}, {}
        for name, pair in self.pairs.items():
            sums = self.sums.pop(name)
            mean = LoraPair(sums["A"].finish() if "A" in sums else pair.A,
                            sums["B"].finish() if "B" in sums else pair.B)
            svd, failed, route = None, False, {}
            if "product" in sums:
                try:
                    svd = method.streamed_svd(name, mean, sums.pop("product"), self.weight, scaling)
                except torch.linalg.LinAlgError:
                    failed = True
                else:
                    route = {"svd": svd.route, **({"svd_error": svd.error} if svd.route == "sketch" else {})}
            result = method.layer_result(name, pair, [mean], [1.0], scaling, t, svd, self.layer_states.get(name, {}),
                                         failed=failed)
            stats = {**(result.stats or {}), **method.streamed_stats(name, mean, sums.get("noise"), self.weight,
                                                                     scaling), **route}
            method.collect_layer(name, result, stats, lora, backbone, per_layer, new_state)
        return Aggregate(lora, backbone, method.round_stats(per_layer, lora, backbone, self.uplink, t), new_state)

    @property
    def nbytes(self) -> int:
        """The memory the round's sums hold (flat in the number of clients)."""
        return sum(acc.nbytes for sums in self.sums.values() for acc in sums.values())


def _padded(pair: LoraPair, rank: int, factor: str):
    """``pair``'s ``factor`` zero-padded to ``rank`` (a client of lower rank, FedEx-LoRA: HetLoRA-style)."""
    extra = rank - pair.rank
    if factor == "A":
        return pair.A if extra <= 0 else torch.nn.functional.pad(pair.A, (0, 0, 0, extra))
    return pair.B if extra <= 0 else torch.nn.functional.pad(pair.B, (0, extra))
