"""What every aggregation method shares: input checks, client weights, per-layer loop, round stats, the method's
state (the small pieces of maths several methods use are in ``shared.py``).

A method sees tensors only, and never changes: what it carries from one round to the next (its state: FedMomentum's
held residuals) goes into ``aggregate`` and comes back in ``Aggregate.state``, like optax's ``update``. Rounds are
1-based: ``t`` is the ``t``-th aggregation (0: before training). Subclasses implement ``aggregate_layer`` for one
layer; the base class checks the updates, computes ``p_i``, brings every update to the global LoRA scaling (a client
of another rank has its own ``s_k``), casts to the aggregation dtype and totals the stats. A method that needs an SVD
says of what in ``svd_terms``; the base class takes those SVDs (``linalg.decompose``: a route per group of layers of
equal shape, by cost; batched a chunk at a time as the layers are aggregated, unless ``batched=False``) and hands each
layer its own.

Every method also takes a server optimizer (``server_opt``: FedAvgM, FedAdam, FedYogi, FedAdagrad; ``server_opt.py``):
after ``aggregate_layer`` proposes a layer's result, the base class takes the optimizer's step on it, on the averaged
factors or on ``W + s B A`` as ``update_space`` says, with the moments in the method's state (slots ``opt_…``), so a
method needs no code of its own for it.

Besides ``aggregate``, two optional parts of the contract:

- ``start(global_lora, weights, scaling=s)``: called once before round 1 with the adapted layers' current
  backbone weights; a method that initialises from them (FRLoRA) returns the initial adapter and a backbone delta;
- ``client_start(global_lora, own=..., rank=..., scaling=..., global_scaling=...)``: the adapter one client trains
  from: the global one at the client's own rank, with the factors the method keeps on the client (``local``,
  FedSA-LoRA's ``B``) taken from the client's own state.
"""

from __future__ import annotations

import math
import numbers
import typing
import zlib
from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import torch

from ..keys import check as check_declared
from ..keys import declared
from ..linalg import EXACT_KINDS, ProductSketch, ProductSVD, Terms, decompose
from ..types import Aggregate, ClientUpdate, LayerStats, LoraPair, LowRank, RoundStats, StateDict, Tensor, UpdateError
from .option_specs import AggregationDtype, MethodOptions
from .server_opt import DEFAULT_BETAS, DEFAULT_LR, SERVER_OPTS, ServerOpt
from .server_opt import PREFIX as OPT_PREFIX
from .shared import at_rank

WIRE_BYTES = 4  # float32 on the wire
DTYPES = {name: getattr(torch, name) for name in typing.get_args(AggregationDtype)}


class LayerResult(NamedTuple):
    """One layer's aggregate: the new adapter, a backbone delta (or None), stats, and the layer's part of the
    method's state after the round (``slot → tensor``)."""

    lora: LoraPair
    backbone: LowRank | None = None
    stats: LayerStats | None = None
    state: dict[str, Tensor] | None = None


class Method:
    """Base class: FedIT-style training of both factors; subclasses override what differs."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[MethodOptions]] = MethodOptions  # its options, declared torch-free (option_specs.py)
    exact: ClassVar[bool] = True
    mixed_ranks: ClassVar[bool] = False  # may clients send ranks other than the global rank?
    local: ClassVar[tuple[str, ...]] = ()  # factors each client keeps between rounds instead of the global ones
    uses_backbone: ClassVar[bool] = False  # does ``start`` need the backbone weights?
    # where a server optimizer acts (``server_opt.py``): "factors" (the averaged factors) or "product" (W + s B A)
    update_space: ClassVar[str] = "factors"
    svd: str = "auto"  # the route of the SVDs asked for in ``svd_terms`` (an option of some methods)
    backbone_wire_bytes: int = WIRE_BYTES  # bytes per value of the backbone deltas as sent
    start_state: ClassVar[tuple[str, ...]] = ()  # the state's slots ``client_start`` reads (sent to such clients)

    def __init__(self, options: MethodOptions | None = None, **values):
        """``options``: this method's checked ``Options`` (``methods.create`` passes them), or their fields as
        keywords, checked here; an unknown one, a value of the wrong type or out of range is a ``ValueError``."""
        if options is None:
            unknown = [key for key in values if key not in declared(self.Options)]
            if unknown:
                raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {self.name!r}; it accepts "
                                 f"{', '.join(declared(self.Options))}")
            options = self.Options(**values)
        elif values or not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} takes a {self.Options.__name__} or its fields as keywords")
        check_declared(options, lambda key: f"{self.name} option {key}")
        self.options = options
        self.weighting = options.weighting
        self.dtype = DTYPES[options.dtype]
        self.seed = int(options.seed)
        self.batched = options.batched  # SVDs of equal-shaped layers together (same results; much faster on a GPU)
        self.server_opt = _server_opt(options.server_opt, options.server_lr, options.server_momentum,
                                      options.server_betas, options.server_eps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # --- the contract -------------------------------------------------------------------------------

    def trainable(self, t: int) -> dict[str, bool]:
        """Which factors the clients train in round ``t`` (1-based; 0 = before training)."""
        return {"A": True, "B": True}

    def aggregate(
        self,
        global_lora: dict[str, LoraPair],
        updates: list[ClientUpdate],
        *,
        scaling: float,
        t: int = 1,
        state: StateDict | None = None,
    ) -> Aggregate:
        """Combine the clients' factors of round ``t`` (1-based) into a new global adapter and backbone deltas.

        ``state`` is the method's state after the previous round (``Aggregate.state``; empty before round 1); the
        state after this round comes back in the result, and neither the method nor ``state`` is changed.
        An update with its own ``scaling`` ``s_k`` (a client of another rank) enters as ``s_k B_k A_k``: its ``B``
        is multiplied by ``s_k / s`` before the method sees it, so every method works in the global scale.
        Input that cannot be aggregated (see ``validate``), and a result that overflows the aggregation dtype, raise
        ``UpdateError`` naming the problem; nothing non-finite is ever returned.
        """
        self.check_round(scaling, t)
        state = state or {}
        self.validate(global_lora, updates, scaling)
        layer_states = _by_layer(state, global_lora, self.dtype)
        weights = self.client_weights(updates)
        ratios = [1.0 if u.scaling is None else float(u.scaling) / scaling for u in updates]
        pairs = {name: pair.to(self.dtype) for name, pair in global_lora.items()}
        clients = {name: [_rescaled(u.factors[name].to(self.dtype), ratio) for u, ratio in zip(updates, ratios,
                                                                                                 strict=True)]
                   for name in pairs}
        terms = {name: self.svd_terms(name, pair, clients[name], weights, scaling, t)
                 for name, pair in pairs.items()}
        decomposed = self._svds({name: terms_ for name, terms_ in terms.items() if terms_ is not None})
        lora, backbone, per_layer, new_state = {}, {}, {}, {}
        for name, pair in pairs.items():
            svd = decomposed.get(name) if terms[name] is not None else None
            failed = terms[name] is not None and svd is None
            result = self.layer_result(name, pair, clients[name], weights, scaling, t, svd, layer_states.get(name, {}),
                                       failed=failed)
            self.collect_layer(name, result, {**(result.stats or {}), **(decomposed.stats(name) if terms[name]
                                                                            is not None else {})},
                               lora, backbone, per_layer, new_state)
        uplink = {(u.client_id or str(i)): self.uplink_bytes(u, t) for i, u in enumerate(updates)}
        return Aggregate(lora, backbone, self.round_stats(per_layer, lora, backbone, uplink, t), new_state)

    def open_round(self, global_lora: dict[str, LoraPair], *, scaling: float, t: int = 1,
                   state: StateDict | None = None, stream: bool = True):
        """A round whose updates arrive one at a time: ``fold(update)`` each (checked as it arrives, as
        ``validate`` would), then ``finish()`` for the ``Aggregate`` that ``aggregate`` gives on the same updates.

        With ``stream`` and a method that says what to keep (``stream_sums``), each update is folded into running
        sums and dropped (``stream.StreamedRound``: memory flat in the number of clients; the result equals
        ``aggregate``'s to round-off for the exact routes, within its recorded ``svd_error`` for the sketch);
        otherwise the updates are collected and aggregated at the end (``stream.CollectedRound``, the same
        result as ``aggregate``, exactly)."""
        from .stream import CollectedRound, StreamedRound  # the round classes build on this module

        if stream and self.stream_sums(t) is not None:
            return StreamedRound(self, global_lora, scaling=scaling, t=t, state=state)
        return CollectedRound(self, global_lora, scaling=scaling, t=t, state=state)

    def check_round(self, scaling: float, t: int) -> None:
        """``UpdateError`` unless ``scaling`` is a finite number > 0 and ``t`` an integer ≥ 1."""
        if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(scaling) \
                or scaling <= 0:
            raise UpdateError(f"{self.name}: scaling must be a finite number > 0, got {scaling!r}")
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1:
            raise UpdateError(f"{self.name}: the round t must be an integer ≥ 1, got {t!r}")

    def layer_result(self, name: str, pair: LoraPair, clients: list[LoraPair], weights: list[float], scaling: float,
                     t: int, svd: ProductSVD | None, layer_state: dict[str, Tensor], *,
                     failed: bool = False) -> LayerResult:
        """One layer's checked result: ``aggregate_layer``, then the server optimizer's step; an SVD that failed
        (``failed``, or while the layer was aggregated) or a result that is not finite is an ``UpdateError``."""
        try:
            if failed:
                raise torch.linalg.LinAlgError(name)
            own, moments = _split_state(layer_state)
            result = self.aggregate_layer(name, pair, clients, weights, scaling, t, svd, own)
            if self.server_opt is not None:
                result = self._server_step(pair, result, scaling, t, moments)
        except torch.linalg.LinAlgError:
            result = None
        self._check_result(name, result)
        return result

    @staticmethod
    def collect_layer(name: str, result: LayerResult, stats: dict, lora: dict, backbone: dict, per_layer: dict,
                      new_state: dict) -> None:
        """Put one layer's result into the round's adapter, backbone deltas, stats and state."""
        lora[name] = result.lora
        if result.backbone is not None and result.backbone.rank > 0:
            backbone[name] = result.backbone
        per_layer[name] = stats
        for slot, tensor in (result.state or {}).items():
            new_state.setdefault(slot, {})[name] = tensor

    def _server_step(self, global_pair: LoraPair, result: LayerResult, scaling: float, t: int,
                     moments: dict[str, Tensor]) -> LayerResult:
        """``result`` after the server optimizer's step (``server_opt.py``), with its moments in the layer's state."""
        opt, state, stats = self.server_opt, dict(result.state or {}), dict(result.stats or {})
        if self.update_space == "product":
            backbone, slots, momentum_rank = opt.product(global_pair, result.lora, result.backbone, scaling, moments)
            lora = result.lora
            stats["residual_rank"] = 0 if backbone is None else backbone.rank
            if momentum_rank is not None:
                stats["momentum_rank"] = momentum_rank
        else:
            lora, slots = opt.factors(global_pair, result.lora, self.shared(t), moments)
            backbone = result.backbone
        state.update(slots)
        return LayerResult(lora, backbone, stats, state)

    def shared(self, t: int) -> dict[str, bool]:
        """Which global factors the server sends the clients after round ``t``: the trained ones, except those each
        client keeps for itself (``local``)."""
        trained = self.trainable(t)
        return {factor: trained[factor] and factor not in self.local for factor in ("A", "B")}

    def start(self, global_lora: dict[str, LoraPair], weights: Mapping[str, Tensor], *,
              scaling: float) -> Aggregate | None:
        """Before round 1: a new initial adapter and backbone deltas computed from the adapted layers' backbone
        ``weights`` (``out×in``, read on demand), or ``None`` to keep the seeded LoRA init (every method but FRLoRA).
        Called only when ``uses_backbone`` is set."""
        return None

    def checked_start(self, global_lora: dict[str, LoraPair], weights: Mapping[str, Tensor], *,
                      scaling: float) -> Aggregate | None:
        """``start``, its result checked like every aggregate: an adapter or backbone delta that is not finite (a
        backbone weight holding NaN or Inf) is an ``UpdateError`` naming the layer, never applied."""
        def refuse(name: str) -> UpdateError:
            return UpdateError(f"{self.name}'s start, layer {name!r}: the initial adapter or backbone delta is not "
                               "finite (check the model's weights for NaN or Inf)")

        try:
            result = self.start(global_lora, weights, scaling=scaling)
        except torch.linalg.LinAlgError:  # an SVD of a weight holding NaN or Inf
            bad = next((name for name in global_lora if not _all_finite([weights[name]])), next(iter(global_lora)))
            raise refuse(bad) from None
        if result is None:
            return None
        for name, pair in result.lora.items():
            delta = result.backbone.get(name)
            if not _all_finite([pair.A, pair.B] + ([] if delta is None else [delta.left, delta.right])):
                raise refuse(name)
        return result

    def client_start(
        self,
        global_lora: dict[str, LoraPair],
        *,
        own: dict[str, dict[str, Tensor]] | None = None,
        rank: int | None = None,
        scaling: float | None = None,
        global_scaling: float | None = None,
        t: int = 1,
        state: StateDict | None = None,
    ) -> dict[str, LoraPair]:
        """The adapter a client trains from in round ``t``.

        ``rank``/``scaling``: the client's LoRA rank ``r_k`` and scaling ``s_k`` when they differ from the global
        adapter's (``global_scaling`` = ``s``). The client's model then starts as ``s_k B_k A_k = s B A`` exactly
        when ``r_k ≥ rank(B A)`` (new slots get ``B`` column 0 and a fresh ``A`` row), else as its best rank-``r_k``
        part (FlexLoRA's redistribution: the truncated SVD). ``own``: the client's kept factors
        (``{"B": {layer: B_k}}``, see ``local_state``), used instead of the global ones. ``state``: the method's
        state after the previous round (``ServerState.method``; only its ``start_state`` slots are needed, which
        FlexLoRA uses for clients above the global rank).
        """
        resize = rank is not None
        if resize and not self.mixed_ranks:
            raise ValueError(f"{self.name} needs every client at the global rank; it cannot mix ranks "
                             "(use flora, fedex-lora, flexlora or fedmomentum)")
        ratio = 1.0 if scaling is None or global_scaling is None else global_scaling / scaling
        start = {}
        for name, pair in global_lora.items():
            if resize and (rank != pair.rank or ratio != 1.0):
                pair = at_rank(pair, rank, ratio, lambda n, name=name, pair=pair: self.fresh_A(
                    f"{name}/start", n, pair.shape[1], t))
            start[name] = pair
        for factor, layers in (own or {}).items():
            if factor not in self.local:
                raise ValueError(f"{self.name} keeps no {factor!r} on the clients (it keeps {self.local or 'none'})")
            for name, value in layers.items():
                pair = start.get(name)
                current = getattr(pair, factor) if pair is not None else None
                if current is None or tuple(value.shape) != tuple(current.shape):
                    raise ValueError(f"the client's own {factor} for layer {name!r} does not fit the global "
                                     "adapter (another model or rank?)")
                start[name] = LoraPair(value, pair.B) if factor == "A" else LoraPair(pair.A, value)
        return start

    def local_state(self, update: ClientUpdate) -> StateDict:
        """What the client keeps after training (its ``local`` factors, ``{factor: {layer: tensor}}``);
        ``{}`` for a method that keeps nothing on the clients. ``client.train_round`` puts it in ``update.keep``."""
        return {factor: {name: getattr(pair, factor) for name, pair in update.factors.items()}
                for factor in self.local}

    def check_ranks(self, global_rank: int, client_ranks: list[int]) -> None:
        """Raise ``ValueError`` when the method cannot train clients of these ranks against this global rank."""
        if not self.mixed_ranks and any(r != global_rank for r in client_ranks):
            raise ValueError(f"{self.name} needs every client at the global rank {global_rank}; it cannot mix "
                             f"ranks {sorted(set(client_ranks))} (use flora, fedex-lora, flexlora or fedmomentum)")

    def _svds(self, terms: dict[str, Terms]) -> Mapping[str, ProductSVD]:
        """The layers' SVDs (``linalg.decompose``: a route per group of equal-shaped layers, by cost unless ``svd``
        names one; taken a chunk at a time as ``aggregate`` asks for them). A layer whose SVD fails to converge is
        left out (``aggregate`` reports it). A method that keeps less than all of the energy (``residual_energy``)
        lets the route be approximate within a tenth of what it drops."""
        return decompose(terms, self.svd, batched=self.batched, energy=getattr(self, "residual_energy", 1.0))

    def _check_result(self, name: str, result: LayerResult | None) -> None:
        """A layer whose aggregate is not finite (or whose SVD failed on it) overflowed the aggregation dtype."""
        tensors = [] if result is None else [result.lora.A, result.lora.B, *(result.state or {}).values()]
        if result is not None and result.backbone is not None:
            tensors += [result.backbone.left, result.backbone.right]
        numbers_ = [v for v in (result.stats or {}).values() if isinstance(v, float)] if result else []
        if result is None or not _all_finite(tensors) or not all(math.isfinite(v) for v in numbers_):
            dtype = str(self.dtype).removeprefix("torch.")
            what = ("the SVD of the aggregate failed to converge" if result is None
                    else f"the aggregate overflows {dtype}")
            raise UpdateError(f"{self.name}, layer {name!r}: {what} (the clients' factors are too large); check the "
                              "clients' training" + (", or aggregate in float64 (dtype='float64')"
                                                     if dtype != "float64" else ""))

    # --- for subclasses -----------------------------------------------------------------------------

    def svd_terms(self, name: str, global_pair: LoraPair, clients: list[LoraPair], weights: list[float],
                  scaling: float, t: int) -> Terms | None:
        """The low-rank sum whose SVD ``aggregate_layer`` needs for this layer (None: no SVD, the default)."""
        return None

    def aggregate_layer(
        self,
        name: str,
        global_pair: LoraPair,
        clients: list[LoraPair],
        weights: list[float],
        scaling: float,
        t: int,
        svd: ProductSVD | None,
        state: dict[str, Tensor],
    ) -> LayerResult:
        """One layer's result in round ``t``; ``svd`` is the SVD of ``svd_terms``, ``state`` the layer's part of the
        method's state after the previous round (``slot → tensor``; read it, never change it)."""
        raise NotImplementedError

    def client_weights(self, updates: list[ClientUpdate]) -> list[float]:
        """``p_i = n_i / Σ n_j`` (or uniform)."""
        if self.weighting == "uniform":
            return [1.0 / len(updates)] * len(updates)
        total = sum(int(u.num_examples) for u in updates)
        return [int(u.num_examples) / total for u in updates]

    def fresh_A(self, name: str, rows: int, in_features: int, t: int) -> Tensor:
        """Rows of a new LoRA ``A`` as PEFT initialises it (kaiming-uniform), seeded by method seed, round ``t``
        (1-based; seeded as ``t − 1``, the numbering of earlier versions, so results stay the same) and layer."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + (t - 1) * 10_007
                                                  + zlib.crc32(name.encode()))
        bound = 1.0 / math.sqrt(in_features)
        return (torch.rand(rows, in_features, generator=generator, dtype=self.dtype) * 2 - 1) * bound

    # --- checks and stats ---------------------------------------------------------------------------

    def validate(self, global_lora: dict[str, LoraPair], updates: list[ClientUpdate],
                 scaling: float | None = None) -> None:
        """Raise ``UpdateError`` naming the client and layer for anything that cannot be aggregated."""
        if not updates:
            raise UpdateError(f"{self.name}: no client updates to aggregate")
        self.validate_adapter(global_lora)
        for index, update in enumerate(updates):
            self.validate_update(global_lora, update, index, scaling)

    def validate_adapter(self, global_lora: dict[str, LoraPair]) -> None:
        """Raise ``UpdateError`` unless the global adapter is LoRA factors (2-D tensors of matching rank)."""
        if not global_lora:
            raise UpdateError(f"{self.name}: the global adapter has no layers")
        for name, g in global_lora.items():
            if not isinstance(g, LoraPair) or not isinstance(g.A, Tensor) or not isinstance(g.B, Tensor):
                raise UpdateError(f"global adapter, layer {name!r}: expected a LoraPair of tensors")
            if g.A.ndim != 2 or g.B.ndim != 2 or g.A.shape[0] != g.B.shape[1]:
                raise UpdateError(f"global adapter, layer {name!r}: A {tuple(g.A.shape)} and B {tuple(g.B.shape)} "
                                  "are not the factors of one LoRA layer")
        factors = [(f"global adapter, layer {name!r}", factor, getattr(g, factor))
                   for name, g in global_lora.items() for factor in ("A", "B")]
        _check_finite(factors)

    def validate_update(self, global_lora: dict[str, LoraPair], update: ClientUpdate, index: int = 0,
                        scaling: float | None = None) -> None:
        """Raise ``UpdateError`` naming the client (its id, else ``index``) and layer for anything in ``update``
        that cannot be aggregated against the (checked) global adapter."""
        who = f"client {update.client_id or index!r}"
        n = update.num_examples
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
            raise UpdateError(f"{who}: num_examples must be a positive integer, got {n!r}")
        s_k = update.scaling
        if s_k is not None:
            if isinstance(s_k, bool) or not isinstance(s_k, numbers.Real) or not math.isfinite(s_k) or s_k <= 0:
                raise UpdateError(f"{who}: scaling must be a positive finite number, got {s_k!r}")
            if scaling is not None and s_k != scaling and not self.mixed_ranks:
                raise UpdateError(f"{who}: LoRA scaling {s_k} differs from the global {scaling}, and "
                                  f"{self.name} needs one rank and scaling on every client")
        missing = sorted(set(global_lora) - set(update.factors))
        extra = sorted(set(update.factors) - set(global_lora))
        if missing or extra:
            raise UpdateError(f"{who}: layers do not match the global adapter "
                              f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                              f"extra {extra[:3]}{'…' if len(extra) > 3 else ''})")
        factors = []
        for name, g in global_lora.items():
            pair = update.factors[name]
            A, B = pair.A, pair.B
            where = f"{who}, layer {name!r}"
            if A.ndim != 2 or B.ndim != 2:
                raise UpdateError(f"{where}: A and B must be matrices, got A {tuple(A.shape)}, B {tuple(B.shape)}")
            if A.shape[1] != g.A.shape[1] or B.shape[0] != g.B.shape[0] or A.shape[0] != B.shape[1]:
                raise UpdateError(f"{where}: shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit the "
                                  f"global A {tuple(g.A.shape)}, B {tuple(g.B.shape)}")
            if A.shape[0] != g.rank and not self.mixed_ranks:
                raise UpdateError(f"{where}: rank {A.shape[0]} differs from the global rank {g.rank}, "
                                  f"and {self.name} needs equal ranks (use flora, fedex-lora, flexlora "
                                  f"or fedmomentum for mixed ranks)")
            factors += [(where, "A", A), (where, "B", B)]
        _check_finite(factors)

    def uplink_bytes(self, update: ClientUpdate, t: int) -> int:
        """What the client sent in round ``t``: its trained factors, float32."""
        trained = self.trainable(t)
        return WIRE_BYTES * sum(p.A.numel() * trained["A"] + p.B.numel() * trained["B"]
                                for p in update.factors.values())

    # --- streaming (``stream.py``) ------------------------------------------------------------------

    def stream_sums(self, t: int) -> frozenset[str] | None:
        """What a streamed round of ``t`` keeps of each layer instead of the updates: ``"A"``/``"B"`` (running
        sums of the factors, padded to the global rank), ``"product"`` (``Σ w_i B_i A_i``, for the SVD:
        ``streamed_svd``) or ``"noise"`` (the same sum, for ``streamed_stats`` only). ``None``: the method needs
        every update at once, and its rounds are collected, then aggregated (the default)."""
        return None

    def product_scale(self, scaling: float) -> float:
        """The factor on ``Σ p_i B_i A_i`` in the terms ``svd_terms`` gives (1, or ``s`` for a method that
        decomposes ``s Σ p_i B_i A_i``)."""
        return 1.0

    def streamed_svd(self, name: str, mean: LoraPair, product, weight: float, scaling: float) -> ProductSVD:
        """The SVD ``aggregate_layer`` gets in a streamed round: of ``svd_terms``' sum, from the running
        ``product`` (``Σ w_i B_i A_i`` with ``Σ w_i = weight``) and the averaged factors ``mean``."""
        return _finish(product, self.product_scale(scaling) / weight, self.svd)

    def streamed_stats(self, name: str, mean: LoraPair, noise, weight: float, scaling: float) -> dict:
        """Stats a streamed round computes from the sums (what ``aggregate_layer`` computes from the clients)."""
        return {}

    def round_stats(self, per_layer, lora, backbone, uplink: dict[str, int], t) -> RoundStats:
        """Totals over layers, plus what each client sends (``uplink``: client → bytes, ``uplink_bytes``) and
        receives (float32 factors; backbone deltas at ``backbone_wire_bytes`` a value)."""
        sent = self.shared(t)
        downlink = (
            WIRE_BYTES * sum(p.A.numel() * sent["A"] + p.B.numel() * sent["B"] for p in lora.values())
            + self.backbone_wire_bytes * sum(d.left.numel() + d.right.numel() for d in backbone.values())
        )
        noises = [s["noise_norm"] for s in per_layer.values() if s.get("noise_norm") is not None]
        energy = sum(s.get("energy", 0.0) for s in per_layer.values())
        dropped = sum(s.get("energy", 0.0) * s.get("energy_dropped", 0.0) for s in per_layer.values())
        return RoundStats(**{
            "method": self.name,
            "round": t,
            "clients": len(uplink),
            "rank_kept": max(p.rank for p in lora.values()),
            "residual_rank": sum(d.rank for d in backbone.values()),
            "energy_dropped": dropped / energy if energy > 0 else 0.0,
            "noise_norm": math.sqrt(sum(n * n for n in noises)) if noises else None,
            "uplink_bytes": sum(uplink.values()) / len(uplink),
            "downlink_bytes": downlink,
            "uplink_bytes_per_client": uplink,
            "layers": per_layer,
        })


def _server_opt(kind, lr, momentum, betas, eps) -> ServerOpt | None:
    """The server optimizer of the options (None for ``none``); a bad value is a ``ValueError`` naming it."""
    if kind not in SERVER_OPTS:
        raise ValueError(f"server_opt must be one of {', '.join(SERVER_OPTS)}, got {kind!r}")
    if lr is not None and not (_real(lr) and lr > 0):
        raise ValueError(f"server_lr must be a finite number > 0, got {lr!r}")
    if not (_real(momentum) and 0 <= momentum < 1):
        raise ValueError(f"server_momentum must be a number in [0, 1), got {momentum!r}")
    betas = DEFAULT_BETAS if betas is None else betas
    if not (isinstance(betas, list | tuple) and len(betas) == 2 and all(_real(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"server_betas must be two numbers in [0, 1), got {betas!r}")
    if not (_real(eps) and eps > 0):
        raise ValueError(f"server_eps must be a finite number > 0, got {eps!r}")
    if kind == "none":
        return None
    return ServerOpt(kind, float(DEFAULT_LR[kind] if lr is None else lr), float(momentum),
                     (float(betas[0]), float(betas[1])), float(eps))


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _split_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A layer's state as the method's own slots and the server optimizer's (``opt_…``)."""
    own = {slot: t for slot, t in state.items() if not slot.startswith(OPT_PREFIX)}
    return own, {slot: t for slot, t in state.items() if slot.startswith(OPT_PREFIX)}


def _all_finite(tensors: list[Tensor]) -> bool:
    """No NaN or ±Inf in any of ``tensors``: each one's min and max (NaN propagates) in one fast pass without a
    copy, gathered for one device sync."""
    extremes = [torch.stack(torch.aminmax(X)) for X in tensors if X.numel()]
    return not extremes or bool(torch.isfinite(torch.cat(extremes)).all())


def _check_finite(factors: list[tuple[str, str, Tensor]]) -> None:
    """``UpdateError`` naming the first of ``(where, factor, tensor)`` that holds NaN or Inf (one pass and one
    device sync for all; then the culprit is found)."""
    if not _all_finite([X for _, _, X in factors]):
        where, factor = next((where, factor) for where, factor, X in factors if not _all_finite([X]))
        raise UpdateError(f"{where}: factor {factor} has NaN or Inf values")


def _finish(product, scale: float, kind: str) -> ProductSVD:
    """A streamed sum's SVD at ``scale``: the sketch's, or the exact one by ``kind`` (``auto`` by cost)."""
    if isinstance(product, ProductSketch):
        return product.finish(scale)
    return product.finish(scale, kind if kind in EXACT_KINDS else "auto")


def _rescaled(pair: LoraPair, ratio: float) -> LoraPair:
    """``pair`` with ``B`` multiplied by ``ratio = s_k / s``, so that ``s B A`` is the client's ``s_k B_k A_k``."""
    return pair if ratio == 1.0 else LoraPair(pair.A, pair.B * ratio)


def _by_layer(state: StateDict, global_lora: dict[str, LoraPair], dtype: torch.dtype) -> dict[str, dict[str, Tensor]]:
    """The method's state (``slot → layer → tensor``) as ``layer → slot → tensor`` in the aggregation dtype; a layer
    the adapter lacks is an ``UpdateError`` (a state from another model)."""
    by_layer: dict[str, dict[str, Tensor]] = {}
    for slot, layers in state.items():
        for name, tensor in layers.items():
            if name not in global_lora:
                raise UpdateError(f"the method's state has {slot!r} for layer {name!r}, which the adapter lacks")
            by_layer.setdefault(name, {})[slot] = tensor.to(dtype)
    return by_layer
