"""The aggregation's speed and memory: one Llama-2-7B-shaped round, and how the SVD routes and the streaming
accumulators scale with the number of clients.

One number of clients (``--clients 10``, the default): one FedMomentum round (defaults: exact) of a 7B-shaped
adapter (q, k, v, o of 32 blocks: 128 layers of 4096×4096, r = 16) through ``method.aggregate``, by the per-layer
route and the batched one (layers of equal shape decomposed a chunk at a time by single batched calls), timed
alternately in one process; the working memory each round needs above its inputs (peak resident memory during
the round minus the memory before it); and, on ``--dense-layers`` of those layers, the dense routes published code
uses (``torch.linalg.svd`` and ``torch.svd_lowrank`` of the dense sum).

A list of client counts (``--clients 10,40,160,320,1000``):

* routes against N, on one 4096×4096 layer: ``linalg.decompose`` by the factored, dense and ``auto`` routes (exact)
  and by ``auto`` for ``residual_energy = 0.99`` (the matrix-free sketch when it is cheaper); CPU and wall time,
  the working memory, and for the sketch its estimated and its true relative error (against the dense sum);
* streaming, a simulated round of N clients whose factors are made one client at a time: the server holding
  every reply (as ``method.aggregate`` needs) against the accumulators of ``linalg.stream`` folding each reply as
  it arrives (``FactorSum`` for FedIT's averages, ``ProductSum`` exact, ``ProductSketch``), then finishing; the
  bytes held and the peak working memory, for the tiny test model's shapes and for ``--stream-layers`` of the 7B
  round's layers;
* ``--plot PATH``: both as a figure.

Every measurement runs in its own fresh process (so that peak memory is its own). Client factors: each client
moves the global adapter by a training-like step (``B_i = B + δB_i``, ``A_i = A + δA_i``), so the sum has a
dominant rank-r part and a tail, as after a round of local training.

    .venv/bin/python benchmarks/aggregation.py                      # the 7B-shaped round, N = 10
    .venv/bin/python benchmarks/aggregation.py --clients 10,40,160,320,1000 --plot docs/aggregation-benchmark.png
    .venv/bin/python benchmarks/aggregation.py --clients 4,16 --dim 512 --stream-layers 1   # a quick look
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

import fedmomentum as fm
from fedmomentum import linalg

SCALING = 2.0  # lora_alpha / r = 32 / 16
TINY_SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}  # models.tiny_model
TINY_BLOCKS, TINY_RANK = 2, 4
ROUTES = [("factored", 1.0), ("dense", 1.0), ("auto", 1.0), ("auto", 0.99)]
STREAMS = ["hold", "mean", "exact", "sketch"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--clients", default="10", help="a number (the 7B round) or a comma-separated list (sweeps)")
    parser.add_argument("--layers", type=int, default=128, help="adapted 4096×4096 layers (7B: q,k,v,o × 32)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dim", type=int, default=4096, help="d = k of every layer")
    parser.add_argument("--dense-layers", type=int, default=3, help="layers also run through the dense routes")
    parser.add_argument("--routes", default="per layer,batched",
                        help="the round's routes: 'per layer,batched', or 'default' (the method's defaults only: "
                             "runs against older sources too, for side-by-side comparisons)")
    parser.add_argument("--randomized-q", type=int, default=None,
                        help="torch.svd_lowrank's q (default N·r, the rank of the sum, so it can be exact)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each route's round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--energy", type=float, default=0.99, help="residual_energy of the approximate rows")
    parser.add_argument("--stream-layers", type=int, default=2, help="7B-shaped layers in the streaming simulation")
    parser.add_argument("--sweeps", default="routes,stream", help="which sweeps a list of client counts runs")
    parser.add_argument("--plot", default=None, help="write the sweeps' figure here (PNG)")
    parser.add_argument("--save", default=None, help="write the sweeps' measurements here (JSON)")
    parser.add_argument("--load", default=None,
                        help="comma-separated JSON files of --save: print and plot those instead of measuring")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # one measurement, in a child process
    return parser.parse_args(argv)


# --- measuring -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn):
        """Wall seconds, this process's CPU seconds (steadier than wall on a shared machine), and the result."""
        self.sync()
        cpu, start = time.process_time(), time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, time.process_time() - cpu, out


class Memory:
    """Working memory: the peak above a baseline. CUDA: ``max_memory_allocated``; CPU: the resident set's high-water
    mark (``VmHWM``), reset at the baseline through ``/proc/self/clear_refs`` (Linux), after returning freed heap
    memory to the system, so that memory already held does not hide new use."""

    def __init__(self, device):
        self.device = device

    def reset(self) -> float:
        """Start a measurement; returns the baseline in MiB."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**20
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self._status("VmRSS")

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self._status("VmHWM")

    @staticmethod
    def _status(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {key} in /proc/self/status")


def lora_like(g, d, k, r, device, dtype):
    """A global adapter's factors at LoRA-like scales (A ~ U(±1/√k) as PEFT inits it, B small)."""
    return ((torch.rand(r, k, generator=g, device=device, dtype=dtype) * 2 - 1) / k**0.5,
            torch.randn(d, r, generator=g, device=device, dtype=dtype) * 1e-2)


def client_step(g, A, B):
    """One client's factors after local training: the global ones moved by a step of its own."""
    r, k = A.shape
    return fm.LoraPair(A + torch.randn(r, k, generator=g, device=A.device, dtype=A.dtype) * 1e-2 / k**0.5,
                       B + torch.randn(*B.shape, generator=g, device=B.device, dtype=B.dtype) * 5e-3)


# --- one 7B-shaped round -----------------------------------------------------------------------------------


def make_round(args, device, dtype):
    g = torch.Generator(device=device).manual_seed(args.seed)
    names = [f"model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj" for i in range(args.layers)]
    global_lora = {name: fm.LoraPair(*lora_like(g, args.dim, args.dim, args.rank, device, dtype)) for name in names}
    updates = [fm.ClientUpdate({name: client_step(g, p.A, p.B) for name, p in global_lora.items()},
                               num_examples=100 + 37 * i, client_id=f"c{i}") for i in range(int(args.clients))]
    return global_lora, updates


def reference(updates, name, weights) -> torch.Tensor:
    """``s Σ p_i B_i A_i`` in float64."""
    return SCALING * sum(w * u.factors[name].B.double() @ u.factors[name].A.double()
                         for w, u in zip(weights, updates, strict=True))


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(approx.double() - exact) / torch.linalg.matrix_norm(exact))


def round_benchmark(args, device):
    dtype = getattr(torch, args.dtype)
    clients = int(args.clients)
    q = clients * args.rank
    q_randomized = args.randomized_q or q
    n_dense = min(args.dense_layers, args.layers)
    global_lora, updates = make_round(args, device, dtype)
    names = list(global_lora)
    options = {"per layer": {"batched": False}, "batched": {"batched": True}, "default": {}}
    routes = {route: fm.methods.create("fedmomentum", dtype=args.dtype, **options[route])
              for route in args.routes.split(",")}
    main_route = list(routes)[-1]
    weights = routes[main_route].client_weights(updates)
    clock, memory = Clock(device), Memory(device)

    # warm up (thread pools, allocator) on a few layers, then time whole rounds, the routes alternately so that a
    # busy machine slows both alike; each round's working memory is its peak above the memory before it
    few = names[: min(4, len(names))]
    for method in routes.values():
        method.aggregate({n: global_lora[n] for n in few},
                         [fm.ClientUpdate({n: u.factors[n] for n in few}, u.num_examples, u.client_id)
                          for u in updates], scaling=SCALING)
    times = {route: [] for route in routes}
    cpu_times = {route: [] for route in routes}
    working = {route: [] for route in routes}
    results = {}
    inputs_mb = None
    for _ in range(args.repeats):
        for route, method in routes.items():
            results[route] = None  # free the previous round's result first
            base = memory.reset()
            inputs_mb = base if inputs_mb is None else min(inputs_mb, base)
            seconds, cpu, results[route] = clock.time(
                lambda method=method: method.aggregate(global_lora, updates, scaling=SCALING))
            working[route].append(memory.peak() - base)
            times[route].append(seconds)
            cpu_times[route].append(cpu)
    agg = results[main_route]
    first = results[next(iter(routes))]
    route_gap = max(float((first.lora[n].A - agg.lora[n].A).abs().max()) for n in names)
    route_gap = max(route_gap, *(float((first.lora[n].B - agg.lora[n].B).abs().max()) for n in names))
    results = first = None

    rows = {"factored": [], "dense": [], "randomized": []}
    for name in names[:n_dense]:
        exact = reference(updates, name, weights)
        merged = SCALING * agg.lora[name].delta() + agg.backbone[name].dense()
        rows["factored"].append(rel_error(merged, exact))
        L, R = linalg.stack([u.factors[name].B for u in updates], [u.factors[name].A for u in updates], weights)

        def dense_exact(L=L, R=R):
            U, S, Vh = torch.linalg.svd(L @ R, full_matrices=False)
            return (U[:, :q] * S[:q]) @ Vh[:q]

        def dense_randomized(L=L, R=R):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(args.seed)
                U, S, V = torch.svd_lowrank(L @ R, q=q_randomized, niter=2)
            return (U * S) @ V.mT

        for route, fn in (("dense", dense_exact), ("randomized", dense_randomized)):
            seconds, _, approx = clock.time(fn)
            rows[route].append((seconds, rel_error(SCALING * approx, exact)))
            del approx

    best = {route: min(t) for route, t in times.items()}
    median = {route: statistics.median(t) for route, t in times.items()}
    per_layer = best[main_route] / args.layers
    factored_err = max(rows["factored"]) if rows["factored"] else float("nan")
    summary = {route: (best[route] / args.layers, factored_err) for route in reversed(routes)}
    for route in ("dense", "randomized"):
        if rows[route]:
            summary[route] = (statistics.mean(t for t, _ in rows[route]), max(e for _, e in rows[route]))

    d = args.dim
    print(f"aggregation round: {args.layers} layers of {d}×{d}, N = {clients} clients, r = {args.rank} "
          f"(Σr = {q}), {args.dtype}, method fedmomentum (defaults)")
    print(f"device: {describe(device)}")
    print(f"dense routes and errors on {n_dense} layer(s); errors are ‖route − sΣpBA‖_F / ‖sΣpBA‖_F vs float64\n")
    labels = {"batched": "factored SVD, batched by shape", "per layer": "factored SVD, per layer",
              "default": "fedmomentum, default options", "dense": "dense exact (linalg.svd)",
              "randomized": f"dense randomized (q={q_randomized})"}
    print(f"{'route':<34}{'per layer':>12}{main_route + ' is':>18}{'rel. error':>13}")
    for route, (seconds, err) in summary.items():
        speedup = "" if route == main_route else f"{seconds / per_layer:,.2f}× faster"
        print(f"{labels[route]:<34}{fmt_time(seconds):>12}{speedup:>18}{err:>13.2e}")
    print(f"\nwhole round ({args.layers} layers), best / median of {args.repeats}, the routes timed alternately:")
    for route in routes:
        cpu = f", CPU {min(cpu_times[route]):.3f} s" if device.type == "cpu" else ""
        print(f"  {labels[route]:<32}{best[route]:8.3f} s / {median[route]:.3f} s{cpu}, "
              f"working memory {max(working[route]):,.0f} MiB")
    if "per layer" in routes and "batched" in routes:
        ratio = best["per layer"] / best["batched"]
        cpu_ratio = (f", CPU-time ratio {min(cpu_times['per layer']) / min(cpu_times['batched']):.2f}×"
                     if device.type == "cpu" else "")
        print(f"  batched / per-layer speed-up: {ratio:.2f}× (medians {median['per layer'] / median['batched']:.2f}×"
              f"{cpu_ratio}); largest |difference| of the two routes' adapters: {route_gap:.1e}")
    print(f"memory before a round (inputs and the process): {inputs_mb:,.0f} MiB; working memory is the largest "
          f"peak above it over the {args.repeats} rounds")
    return summary, best[main_route]


def describe(device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}); torch {torch.__version__}"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads); " \
           f"torch {torch.__version__}"


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


# --- sweeps against N: each cell in a fresh process ----------------------------------------------------------


def route_cell(spec, device) -> dict:
    """One layer's SVD by one route: time, working memory, route taken, estimated and true error (sketch)."""
    dtype = getattr(torch, spec["dtype"])
    d, r, n = spec["dim"], spec["rank"], spec["clients"]
    g = torch.Generator(device=device).manual_seed(spec["seed"])
    A, B = lora_like(g, d, d, r, device, dtype)
    clients = [client_step(g, A, B) for _ in range(n)]
    weights = [(100 + 37 * i) for i in range(n)]
    total = sum(weights)
    terms = {"layer": linalg.Terms([c.B for c in clients], [c.A for c in clients], [w / total for w in weights])}
    clock, memory = Clock(device), Memory(device)
    base = memory.reset()
    wall, cpu, svd = clock.time(lambda: linalg.decompose(terms, spec["route"], energy=spec["energy"])["layer"])
    out = {**spec, "wall": wall, "cpu": cpu, "working_mib": memory.peak() - base, "taken": svd.route,
           "width": len(svd.S), "error": svd.error}
    if svd.route == "sketch":
        L, R = terms["layer"].stacked()
        M = L @ R
        out["true_error"] = float(torch.linalg.matrix_norm((svd.U() * svd.S) @ svd.Vh() - M)
                                  / torch.linalg.matrix_norm(M))
    return out


def stream_shapes(spec) -> tuple[dict[str, tuple[int, int]], int]:
    if spec["shapes"] == "tiny":
        return {f"model.layers.{b}.self_attn.{p}": s for b in range(TINY_BLOCKS) for p, s in TINY_SHAPES.items()}, \
            TINY_RANK
    return {f"model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj": (spec["dim"], spec["dim"])
            for i in range(spec["layers"])}, spec["rank"]


def stream_cell(spec, device) -> dict:
    """A round of N clients whose replies arrive one at a time: held (``hold``) or folded into accumulators."""
    dtype = getattr(torch, spec["dtype"])
    shapes, r = stream_shapes(spec)
    g = torch.Generator(device=device).manual_seed(spec["seed"])
    global_lora = {name: fm.LoraPair(*lora_like(g, d, k, r, device, dtype)) for name, (d, k) in shapes.items()}
    mode = spec["mode"]
    clock, memory = Clock(device), Memory(device)
    base = memory.reset()

    def make_accumulators():
        if mode == "mean":
            return {name: (linalg.FactorSum(), linalg.FactorSum()) for name in shapes}
        if mode == "exact":
            return {name: linalg.ProductSum(shape, dtype=dtype) for name, shape in shapes.items()}
        if mode == "sketch":
            return {name: linalg.ProductSketch(shape, 4 * r + 10, dtype=dtype, device=device)
                    for name, shape in shapes.items()}
        return None

    def fold_all():
        held, accumulators = [], make_accumulators()
        for i in range(spec["clients"]):
            reply = {name: client_step(g, p.A, p.B) for name, p in global_lora.items()}  # arrives
            weight = 100 + 37 * i
            if accumulators is None:
                held.append(fm.ClientUpdate(reply, weight))
                continue
            for name, pair in reply.items():
                if mode == "mean":
                    accumulators[name][0].fold(pair.A, weight)
                    accumulators[name][1].fold(pair.B, weight)
                else:
                    accumulators[name].fold(pair.B, pair.A, weight)
        return held, accumulators

    fold_wall, fold_cpu, (held, accumulators) = clock.time(fold_all)
    if accumulators is None:
        held_bytes = sum(p.A.numel() * p.A.element_size() + p.B.numel() * p.B.element_size()
                         for u in held for p in u.factors.values())
    else:
        held_bytes = sum(sum(a.nbytes for a in acc) if isinstance(acc, tuple) else acc.nbytes
                         for acc in accumulators.values())

    def finish_all() -> tuple[list[float], set[str]]:
        """Each layer's aggregate (``hold``: the all-at-once route), one layer at a time as a server would (each
        result is dropped before the next layer's is taken); the sketches' errors and the routes taken."""
        errors, routes = [], set()
        if accumulators is None:  # hold: every reply stacked at once, then the route by cost
            total = sum(u.num_examples for u in held)
            terms = {name: linalg.Terms([u.factors[name].B for u in held], [u.factors[name].A for u in held],
                                        [u.num_examples / total for u in held]) for name in shapes}
            decomposed = linalg.decompose(terms)
            for name in shapes:
                routes.add(decomposed[name].route)
            return errors, routes
        for acc in accumulators.values():
            if mode == "mean":
                acc[0].finish(), acc[1].finish()
                continue
            svd = acc.finish()
            errors.append(svd.error)
            routes.add(svd.route)
        return errors, routes

    finish_wall, finish_cpu, (errors, routes) = clock.time(finish_all)
    return {**spec, "fold_wall": fold_wall, "fold_cpu": fold_cpu, "finish_wall": finish_wall,
            "finish_cpu": finish_cpu, "held_mib": held_bytes / 2**20, "working_mib": memory.peak() - base,
            "error": max(errors) if errors else 0.0, "routes": sorted(routes)}


def run_cell(args, spec) -> dict:
    """``spec`` measured in a fresh Python process (its own peak memory)."""
    command = [sys.executable, __file__, "--cell", json.dumps(spec), "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"measurement {spec} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def route_row(row) -> str:
    label = row["route"] if row["energy"] == 1 else f"{row['route']} τ={row['energy']:g}"
    err = f"{row['error']:.1e} / {row['true_error']:.1e}" if "true_error" in row else "exact"
    n = row["clients"]
    return (f"{n:>6}{n * row['rank']:>7}  {label:<18}{row['taken']:<10}{row['width']:>7}{row['cpu']:>10.2f}"
            f"{row['wall']:>10.2f}{row['working_mib']:>12,.0f}{err:>22}")


def stream_row(row) -> str:
    title = (f"tiny ({row['layers']} layers, r={TINY_RANK})" if row["shapes"] == "tiny"
             else f"7B ({row['layers']} of {row['dim']}², r={row['rank']})")
    err = f"{row['error']:.1e}" if row["mode"] == "sketch" else ""
    return (f"{title:<22}{row['clients']:>6}  {row['mode']:<8}{row['held_mib']:>10,.2f}{row['working_mib']:>12,.0f}"
            f"{row['fold_cpu']:>9.2f}{row['finish_cpu']:>10.2f}{err:>14}  {','.join(row['routes'])}")


def sweeps(args, counts):
    """Measure (or, with ``--load``, read back) the sweeps; print them as they come; ``--save`` and ``--plot``."""
    base = {"dim": args.dim, "rank": args.rank, "dtype": args.dtype, "seed": args.seed}
    which = set(args.sweeps.split(","))
    loaded = {"routes": [], "streams": []}
    for path in args.load.split(",") if args.load else []:
        with open(path) as f:
            rows = json.load(f)
        loaded["routes"] += rows["routes"]
        loaded["streams"] += rows["streams"]
    routes, streams = [], []
    print(f"device: {describe(torch.device(args.device))}; every measurement in a fresh process"
          if not args.load else f"read from {args.load}")
    if "routes" in which:
        print(f"\nroutes against N: one {args.dim}×{args.dim} layer, r = {args.rank}, {args.dtype}; working memory "
              "= peak above the inputs; error = ‖M − U S Vh‖_F / ‖M‖_F (sketch: estimated / true)")
        print(f"{'N':>6}{'Σr':>7}  {'route':<18}{'taken':<10}{'width':>7}{'CPU s':>10}{'wall s':>10}"
              f"{'memory MiB':>12}{'error (est / true)':>22}")
        cells = [(n, route, args.energy if energy < 1 else 1.0) for n in counts for route, energy in ROUTES]
        for n, route, energy in cells:
            spec = {**base, "cell": "route", "route": route, "energy": energy, "clients": n}
            row = next((r for r in loaded["routes"] if all(r[k] == v for k, v in spec.items())), None) \
                if args.load else run_cell(args, spec)
            if row is not None:
                routes.append(row)
                print(route_row(row), flush=True)
    if "stream" in which:
        print("\nstreaming: a round of N clients, replies made one at a time. hold: the server keeps every reply, "
              "then decomposes each layer by the auto route; "
              "mean: FactorSum of A and B; exact: ProductSum (factors, dense once larger); sketch: ProductSketch "
              "(width 4r + 10). held = bytes kept at the end of the round; memory = peak above the start "
              "(folding and finishing)")
        print(f"{'shapes':<22}{'N':>6}  {'mode':<8}{'held MiB':>10}{'memory MiB':>12}{'fold s':>9}{'finish s':>10}"
              f"{'sketch error':>14}  routes")
        cells = [(shapes, layers, n, mode) for shapes, layers in (("tiny", TINY_BLOCKS * 4), ("7b", args.stream_layers))
                 for n in counts for mode in STREAMS]
        for shapes, layers, n, mode in cells:
            spec = {**base, "cell": "stream", "shapes": shapes, "layers": layers, "mode": mode, "clients": n}
            row = next((r for r in loaded["streams"] if all(r[k] == v for k, v in spec.items())), None) \
                if args.load else run_cell(args, spec)
            if row is not None:
                streams.append(row)
                print(stream_row(row), flush=True)
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"routes": routes, "streams": streams}, f, indent=1)
        print(f"\nwrote {args.save}")
    if args.plot:
        plot(args, routes, streams)
    return routes, streams


def plot(args, routes, streams):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for route, energy in ROUTES:
        energy = args.energy if energy < 1 else 1.0
        rows = [r for r in routes if r["route"] == route and r["energy"] == energy]
        if rows:
            label = route + (f" (τ = {energy:g})" if energy < 1 else "")
            left.plot([r["clients"] for r in rows], [r["cpu"] for r in rows], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="clients N", ylabel="CPU seconds",
             title=f"one {args.dim}×{args.dim} layer's SVD, r = {args.rank}")
    left.legend()
    for mode in STREAMS:
        rows = [r for r in streams if r["shapes"] == "7b" and r["mode"] == mode]
        if rows:
            right.plot([r["clients"] for r in rows], [r["working_mib"] for r in rows], marker="o", label=mode)
    right.set(xscale="log", yscale="log", xlabel="clients N", ylabel="peak working memory (MiB)",
              title=f"a streamed round, {args.stream_layers} layers of {args.dim}², r = {args.rank}")
    right.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"\nwrote {args.plot}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.cell is not None:
        spec = json.loads(args.cell)
        print(json.dumps(route_cell(spec, device) if spec["cell"] == "route" else stream_cell(spec, device)))
        return None
    counts = [int(n) for n in args.clients.split(",")]
    if len(counts) == 1:
        return round_benchmark(args, device)
    return sweeps(args, counts)


if __name__ == "__main__":
    main()
