"""The aggregation's linear algebra: SVDs of sums of low-rank products ``Σ w_i L_i R_i`` and the energy split.

- ``product``: ``ProductSVD``, one sum's SVD by one route (factored, dense, sketch, randomized), and ``compress``;
- ``cost``: what each route costs from the shapes (behind ``svd="auto"``);
- ``sketch``: the matrix-free randomized SVDs (two-pass with power iterations, and one-pass for streaming);
- ``routes``: a round's SVDs, a route per group of equal-shaped layers, taken a chunk at a time (``decompose``);
- ``stream``: accumulators that fold one client's factors at a time, in memory that does not grow with the
  number of clients;
- ``spectrum``: ranks and norms.
"""

from .product import (
    EXACT_KINDS,
    SVD_KINDS,
    ProductSVD,
    Terms,
    compress,
    dense_svd,
    factored_svd,
    randomized_svd,
    stack,
    svd_of_sum,
)
from .routes import Decompositions, choose_route, decompose, sketch_tolerance, svds
from .sketch import SketchOptions, StreamSketch
from .spectrum import energy_rank, lowrank_norm, numerical_rank, spectral_norm
from .stream import FactorSum, ProductSketch, ProductSum

__all__ = [
    "EXACT_KINDS", "SVD_KINDS", "Decompositions", "FactorSum", "ProductSVD", "ProductSketch", "ProductSum",
    "SketchOptions", "StreamSketch", "Terms", "choose_route", "compress", "decompose", "dense_svd", "energy_rank",
    "factored_svd", "lowrank_norm", "numerical_rank", "randomized_svd", "sketch_tolerance", "spectral_norm",
    "stack", "svd_of_sum", "svds",
]
