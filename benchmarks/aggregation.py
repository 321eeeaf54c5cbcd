"""Time one aggregation round for a Llama-2-7B-shaped adapter: factored SVD (per layer and batched by shape) vs
dense exact vs dense randomized.

The round: q, k, v, o of 32 layers (128 layers of 4096×4096), N = 10 clients, LoRA rank r = 16.

* factored, per layer / batched: ``fedmomentum`` with default options (exact: residual_energy = 1), the whole
  128-layer round through ``method.aggregate`` (input checks, stacking, the factored SVD, adapter and backbone
  delta), with ``batched=False`` (one layer's QRs and SVD at a time) and with the default ``batched=True`` (the
  layers of equal shape stacked and decomposed by single batched calls). The two are timed alternately, in the
  same process, and their results compared.
* dense exact: form the dense ``Σ p_i B_i A_i`` and ``torch.linalg.svd`` it (what a naive server does), on
  ``--dense-layers`` of those layers.
* dense randomized: ``torch.svd_lowrank(Σ p_i B_i A_i, q=N·r, niter=2)`` on the same layers (what published
  federated-LoRA code does; q = N·r so that it can be exact too, ``--randomized-q`` to change it).

Every route is scored by the relative Frobenius error of its reconstruction of ``s Σ p_i B_i A_i`` against a
float64 reference on the dense layers (for the factored route: ``D + s B'A'``, what the clients' models
become). The random factors are made before any timing starts.

    .venv/bin/python benchmarks/aggregation.py                      # the full 7B-shaped round on CPU
    .venv/bin/python benchmarks/aggregation.py --device cuda
    .venv/bin/python benchmarks/aggregation.py --layers 16 --dense-layers 1 --dim 1024   # a quick look
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

import fedmomentum as fm

SCALING = 2.0  # lora_alpha / r = 32 / 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=128, help="adapted 4096×4096 layers (7B: q,k,v,o × 32)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dim", type=int, default=4096, help="d = k of every layer")
    parser.add_argument("--dense-layers", type=int, default=3, help="layers also run through the dense routes")
    parser.add_argument("--randomized-q", type=int, default=None,
                        help="torch.svd_lowrank's q (default N·r, the rank of the sum, so it can be exact)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each factored route's round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_round(args, device, dtype):
    """Global adapter and client updates, LoRA-like scales (A ~ U(±1/√k) as PEFT inits, B small)."""
    g = torch.Generator(device=device).manual_seed(args.seed)
    d = k = args.dim
    r = args.rank

    def pair():
        A = (torch.rand(r, k, generator=g, device=device, dtype=dtype) * 2 - 1) / k**0.5
        B = torch.randn(d, r, generator=g, device=device, dtype=dtype) * 0.01
        return fm.LoraPair(A, B)

    names = [f"model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj" for i in range(args.layers)]
    global_lora = {name: pair() for name in names}
    updates = [fm.ClientUpdate({name: pair() for name in names}, num_examples=100 + 37 * i, client_id=f"c{i}")
               for i in range(args.clients)]
    return global_lora, updates


class Clock:
    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out

    def time_cpu(self, fn):
        """Wall seconds, this process's CPU seconds (steadier than wall on a shared machine), and the result."""
        cpu = time.process_time()
        seconds, out = self.time(fn)
        return seconds, time.process_time() - cpu, out


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated (CUDA) or the process's peak resident set size (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reference(updates, name, weights) -> torch.Tensor:
    """``s Σ p_i B_i A_i`` in float64."""
    return SCALING * sum(w * u.factors[name].B.double() @ u.factors[name].A.double()
                         for w, u in zip(weights, updates, strict=True))


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(approx.double() - exact) / torch.linalg.matrix_norm(exact))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    dtype = getattr(torch, args.dtype)
    q = args.clients * args.rank
    q_randomized = args.randomized_q or q
    n_dense = min(args.dense_layers, args.layers)

    global_lora, updates = make_round(args, device, dtype)
    names = list(global_lora)
    routes = {"per layer": fm.methods.create("fedmomentum", dtype=args.dtype, batched=False),
              "batched": fm.methods.create("fedmomentum", dtype=args.dtype, batched=True)}
    weights = routes["batched"].client_weights(updates)
    clock = Clock(device)
    inputs_mb = peak_memory_mb(device)

    # warm up (thread pools, allocator, first touch of memory) on a few layers, then time whole rounds,
    # the two routes alternately so that a busy machine slows both alike
    few = names[: min(4, len(names))]
    for method in routes.values():
        method.aggregate({n: global_lora[n] for n in few},
                         [fm.ClientUpdate({n: u.factors[n] for n in few}, u.num_examples, u.client_id)
                          for u in updates], scaling=SCALING)
    times = {route: [] for route in routes}
    cpu_times = {route: [] for route in routes}
    results = {}
    for _ in range(args.repeats):
        for route, method in routes.items():
            results[route] = None  # free the previous round's result first
            seconds, cpu, results[route] = clock.time_cpu(
                lambda method=method: method.aggregate(global_lora, updates, scaling=SCALING))
            times[route].append(seconds)
            cpu_times[route].append(cpu)
    factored_mb = peak_memory_mb(device)
    agg = results["batched"]
    route_gap = max(float((results["per layer"].lora[n].A - agg.lora[n].A).abs().max()) for n in names)
    route_gap = max(route_gap, *(float((results["per layer"].lora[n].B - agg.lora[n].B).abs().max()) for n in names))
    results = None

    # accuracy of the factored round, and the dense routes, on the first n_dense layers
    rows = {"factored": [], "dense": [], "randomized": []}
    for name in names[:n_dense]:
        exact = reference(updates, name, weights)
        merged = SCALING * agg.lora[name].delta() + agg.backbone[name].dense()
        rows["factored"].append(rel_error(merged, exact))
        L, R = fm.linalg.stack([u.factors[name].B for u in updates], [u.factors[name].A for u in updates], weights)

        def dense_exact(L=L, R=R):
            U, S, Vh = torch.linalg.svd(L @ R, full_matrices=False)
            return (U[:, :q] * S[:q]) @ Vh[:q]

        def dense_randomized(L=L, R=R):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(args.seed)
                U, S, V = torch.svd_lowrank(L @ R, q=q_randomized, niter=2)
            return (U * S) @ V.mT

        for route, fn in (("dense", dense_exact), ("randomized", dense_randomized)):
            seconds, approx = clock.time(fn)
            rows[route].append((seconds, rel_error(SCALING * approx, exact)))
            del approx
    dense_mb = peak_memory_mb(device)

    best = {route: min(t) for route, t in times.items()}
    median = {route: statistics.median(t) for route, t in times.items()}
    per_layer = best["batched"] / args.layers
    factored_err = max(rows["factored"]) if rows["factored"] else float("nan")
    summary = {"batched": (per_layer, factored_err), "per layer": (best["per layer"] / args.layers, factored_err)}
    for route in ("dense", "randomized"):
        if rows[route]:
            summary[route] = (statistics.mean(t for t, _ in rows[route]), max(e for _, e in rows[route]))

    d = args.dim
    print(f"aggregation round: {args.layers} layers of {d}×{d}, N = {args.clients} clients, r = {args.rank} "
          f"(Σr = {q}), {args.dtype}, method fedmomentum (defaults)")
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"device: {device.type} ({where}); torch {torch.__version__}")
    print(f"dense routes and errors on {n_dense} layer(s); errors are ‖route − sΣpBA‖_F / ‖sΣpBA‖_F vs float64\n")
    print(f"{'route':<34}{'per layer':>12}{'batched is':>18}{'rel. error':>13}")
    labels = {"batched": "factored SVD, batched by shape", "per layer": "factored SVD, per layer",
              "dense": "dense exact (linalg.svd)", "randomized": f"dense randomized (q={q_randomized})"}
    for route, (seconds, err) in summary.items():
        speedup = "" if route == "batched" else f"{seconds / per_layer:,.2f}× faster"
        print(f"{labels[route]:<34}{fmt_time(seconds):>12}{speedup:>18}{err:>13.2e}")
    print(f"\nwhole round ({args.layers} layers), best / median of {args.repeats}, the routes timed alternately:")
    for route in ("per layer", "batched"):
        cpu = f", CPU {min(cpu_times[route]):.3f} s" if device.type == "cpu" else ""
        print(f"  {labels[route]:<32}{best[route]:8.3f} s / {median[route]:.3f} s{cpu}")
    ratio = best["per layer"] / best["batched"]
    cpu_ratio = (f", CPU-time ratio {min(cpu_times['per layer']) / min(cpu_times['batched']):.2f}×"
                 if device.type == "cpu" else "")
    print(f"  batched / per-layer speed-up: {ratio:.2f}× (medians {median['per layer'] / median['batched']:.2f}×"
          f"{cpu_ratio}); largest |difference| of the two routes' adapters: {route_gap:.1e}")
    unit = "GPU max allocated" if device.type == "cuda" else "peak RSS"
    print(f"{unit}: {inputs_mb:,.0f} MiB after making the factors, {factored_mb:,.0f} MiB after the factored "
          f"rounds, {dense_mb:,.0f} MiB after the dense routes")
    return summary, best["batched"]


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


if __name__ == "__main__":
    main()
