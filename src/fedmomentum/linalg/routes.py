"""A round's SVDs, layer by layer: the route of each group of equal-shaped layers, chosen by cost, and the SVDs
taken a chunk of layers at a time, as the aggregation asks for them.

Route (``svd="auto"``): the cheaper exact route (``cost.exact_route``: factored while ``q = Σ r_i`` is small, dense
once it nears ``min(d, k)``); when the caller can lose energy anyway (``energy < 1``: FedMomentum's
``residual_energy``), the matrix-free sketch if it is expected to cost under half the exact route, grown until its
error is within ``tol = √(0.1 (1 − energy))`` (the sketch loses at most a tenth of what ``energy`` lets the method
drop) but never past a width where it would cost as much as the exact route: a layer whose sketch does not get
there in that budget is decomposed by the exact route instead. A route given by name is taken as it is.

Chunks: the SVDs of the layers of one group are taken together (batched: one QR/SVD call per chunk, for the GPU)
in chunks of at most ``chunk_bytes`` of working memory (stacked factors and QR reflectors), and a group's chunk
is dropped when its next one is taken: the memory the SVDs need on top of the round's inputs and outputs is one
chunk per group, not the whole round's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping

import torch

from .cost import exact_cost, exact_route, sketch_cost, sketch_width_budget
from .product import SVD_KINDS, ProductSVD, Terms
from .sketch import SketchOptions

CHUNK_BYTES = {"cpu": 64 * 2**20, "cuda": 1 * 2**30}  # working memory of one chunk of SVDs (other devices: cuda's)
BATCHED_KINDS = ("factored", "sketch")  # the routes that take a batch in one call


def sketch_tolerance(energy: float) -> float:
    """The sketch's relative Frobenius error target for a method that keeps ``energy`` of ``Σ σ²`` (1e-2 when it
    keeps everything: the sketch was then asked for by name)."""
    return math.sqrt(0.1 * (1.0 - energy)) if energy < 1.0 else 1e-2


def choose_route(kind: str, d: int, k: int, q: int, energy: float = 1.0,
                 sketch: SketchOptions | None = None, widest_term: int = 1) -> tuple[str, SketchOptions]:
    """``(route, sketch options)`` for a ``d×k`` sum of rank ``q`` (see the module notes)."""
    if kind not in SVD_KINDS:
        raise ValueError(f"unknown svd {kind!r}; choose one of {', '.join(SVD_KINDS)}")
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sketch = sketch or SketchOptions(tol=sketch_tolerance(energy))
    if kind != "auto":
        return kind, sketch
    exact = exact_route(d, k, q)
    if energy < 1.0:
        budget = exact_cost(d, k, q)
        expected = min(2 * sketch.first_width(widest_term), d, k, q)
        if sketch_cost(d, k, q, expected, sketch.niter, sketch.probes) < 0.5 * budget:
            width = sketch_width_budget(d, k, q, sketch.niter, sketch.probes, budget)
            return "sketch", dataclasses.replace(sketch, max_width=min(width, sketch.max_width or width))
    return exact, sketch


def working_bytes(route: str, d: int, k: int, q: int, itemsize: int, width: int = 0) -> int:
    """The memory one layer's SVD needs besides its inputs (stacked factors, reflectors or the dense matrix)."""
    if route == "factored":
        return 2 * (d + k) * q * itemsize
    if route == "sketch":
        return ((d + k) * q + 3 * (d + k) * width) * itemsize
    return ((d + k) * q + 3 * d * k) * itemsize


class Decompositions(Mapping[str, ProductSVD]):
    """Each layer's ``ProductSVD``, taken when it is first asked for, a chunk of its group at a time.

    A layer whose SVD fails to converge (alone, after its chunk failed) is not in the mapping. ``routes`` names
    the route of every layer (after any fallback from the sketch to an exact route).
    """

    def __init__(self, terms: Mapping[str, Terms], kind: str = "auto", *, batched: bool = True, energy: float = 1.0,
                 sketch: SketchOptions | None = None, chunk_bytes: int | None = None):
        self._terms = dict(terms)
        self._chunks: dict[str, list[str]] = {}  # layer -> the layers of its chunk (one list per chunk)
        self._options: dict[str, SketchOptions] = {}
        self.routes: dict[str, str] = {}
        self.errors: dict[str, float] = {}  # the sketch's estimated relative error, per layer it served
        groups: dict[tuple, list[str]] = {}
        for name, t in self._terms.items():
            groups.setdefault(t.layout(), []).append(name)
        for names in groups.values():
            first = self._terms[names[0]]
            d, k, q = first.shape
            widest = max(x.shape[1] for x in first.lefts)
            route, options = choose_route(kind, d, k, q, energy, sketch, widest)
            device = first.lefts[0].device.type
            budget = chunk_bytes if chunk_bytes is not None else CHUNK_BYTES.get(device, CHUNK_BYTES["cuda"])
            width = min(2 * options.first_width(widest), d, k, q)
            per_layer = working_bytes(route, d, k, q, first.lefts[0].element_size(), width)
            size = max(1, budget // per_layer) if batched and route in BATCHED_KINDS else 1
            for start in range(0, len(names), size):
                chunk = names[start:start + size]
                self._chunks.update((name, chunk) for name in chunk)
            self.routes.update((name, route) for name in names)
            self._options.update((name, options) for name in names)
        self._cache: dict[str, ProductSVD] = {}
        self._failed: set[str] = set()

    def __getitem__(self, name: str) -> ProductSVD:
        if name not in self._cache and name not in self._failed:
            if name not in self._terms:
                raise KeyError(name)
            self._take(self._chunks[name])
        if name in self._failed:
            raise KeyError(name)
        return self._cache[name]

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._terms)

    def __len__(self) -> int:
        return len(self._terms)

    def stats(self, name: str) -> dict[str, float | str]:
        """What to record of a layer's SVD once it was taken: its route and, for the sketch, its estimated relative
        error."""
        return {"svd": self.routes[name], **({"svd_error": self.errors[name]} if name in self.errors else {})}

    def _take(self, chunk: list[str]) -> None:
        """Decompose ``chunk`` (one batch), dropping what is cached of its group's previous chunks."""
        layout = self._terms[chunk[0]].layout()
        for name in [n for n in self._cache if self._terms[n].layout() == layout]:
            del self._cache[name]
        try:
            self._cache.update(self._decompose(chunk))
        except torch.linalg.LinAlgError:
            for name in chunk:  # one at a time, so that one bad layer does not take the others with it
                try:
                    self._cache.update(self._decompose([name]))
                except torch.linalg.LinAlgError:
                    self._failed.add(name)

    def _decompose(self, names: list[str]) -> dict[str, ProductSVD]:
        route, options, first = self.routes[names[0]], self._options[names[0]], self._terms[names[0]]
        widest = max(x.shape[1] for x in first.lefts)
        if len(names) == 1:
            svd = ProductSVD(*first.stacked(), route, sketch=options, widest_term=widest)
            result = {names[0]: svd}
        else:
            d, k, q = first.shape
            L = first.lefts[0].new_empty(len(names), d, q)
            R = first.rights[0].new_empty(len(names), q, k)
            for i, name in enumerate(names):
                self._terms[name].stacked(out=(L[i], R[i]))
            batch = ProductSVD(L, R, route, sketch=options, widest_term=widest)
            result = {name: batch[i] for i, name in enumerate(names)}
        if route == "sketch":  # a sketch that did not reach its tolerance within its budget: the exact route
            missed = [n for n, svd in result.items() if not svd.converged or svd.error > options.tol]
            if missed and options.max_width is not None:
                exact = exact_route(*first.shape)
                for name in missed:
                    result[name] = ProductSVD(result[name].L, result[name].R, exact)
                    self.routes[name] = exact
            self.errors.update((n, svd.error) for n, svd in result.items() if svd.route == "sketch")
        return result


def decompose(terms: Mapping[str, Terms], kind: str = "auto", *, batched: bool = True, energy: float = 1.0,
              sketch: SketchOptions | None = None, chunk_bytes: int | None = None) -> Decompositions:
    """The SVD of each layer's terms, route by route and chunk by chunk (see the module notes and
    ``Decompositions``). ``energy``: the share of ``Σ σ²`` the caller keeps (below 1 the sketch may serve)."""
    return Decompositions(terms, kind, batched=batched, energy=energy, sketch=sketch, chunk_bytes=chunk_bytes)


def svds(terms: Mapping[str, Terms], kind: str = "factored", batched: bool = True) -> dict[str, ProductSVD]:
    """Every layer's ``ProductSVD`` at once (``decompose``, all taken; the exact routes keep ``L @ R`` exact)."""
    if kind not in SVD_KINDS:
        raise ValueError(f"unknown svd {kind!r}; choose one of {', '.join(SVD_KINDS)}")
    return dict(decompose(terms, kind, batched=batched).items())

