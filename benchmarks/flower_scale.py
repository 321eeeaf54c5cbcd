"""The Flower engine with many light nodes: where a round's time goes besides training, per client, against N.

Each N (``--nodes 10,30,100``) is one run of the Flower strategy (``LoraStrategy``) on the in-process grid of the
tests (``tests/flower_helpers.LocalGrid``: every node a real ClientApp in this process, every message and reply
through Flower's wire format and the Runtime API's pull, as on a deployment; no Ray, no network), with N nodes of
the tiny random model, one partition each, all sampled every round, one local step of one example, ``--rounds``
rounds. Rounds of at least ``driver.STREAM_FROM`` clients stream (``clip=none``): each reply is folded as it is
pulled.

Per round, its wall seconds are split into: the clients' training (the ClientApp's ``train`` calls, which the grid
runs inside the server's pull), the checks of each reply (``_parse``: decoding, ``replies.parse_train_reply``,
the method's checks, the replay check), the aggregation (the record's ``aggregation_seconds``: folding and
finishing when streamed), the records (``metrics.jsonl`` / ``aggregation.jsonl``, the checkpoint, the backbone
log and the replays), the evaluation, and the rest: message handling (building and encoding train messages,
pushing, pulling, decoding, polling the nodes, sampling, bookkeeping). Each is printed per client (ms), so its
growth with N shows.

    .venv/bin/python benchmarks/flower_scale.py --nodes 10,30,100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from flwr.clientapp import ClientApp  # noqa: E402

from fedmomentum import checkpoint, driver, records  # noqa: E402
from fedmomentum.config import RunConfig  # noqa: E402
from fedmomentum.flower import client_app, strategy  # noqa: E402
from flower_helpers import LocalGrid, run_local  # noqa: E402

PARTS = ("clients", "checks", "aggregation", "records", "evaluation", "messages")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="10,30,100", help="comma-separated numbers of nodes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="fedmomentum")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


class Timers:
    """Seconds spent in wrapped functions, by part, since the last ``take``."""

    def __init__(self):
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[part] += time.perf_counter() - started

        return timed

    def take(self) -> dict[str, float]:
        spent, self.spent = dict(self.spent), defaultdict(float)
        return spent


def one_run(nodes: int, args, out: Path) -> list[dict]:
    """The run's rounds, each as seconds per part (see the module notes)."""
    timers = Timers()
    app = ClientApp()
    app.query()(client_app.hello)
    app.train()(timers.wrap("clients", client_app.train))
    config = RunConfig(model="tiny", method=args.method, rounds=args.rounds, clients=nodes, clients_per_round=nodes,
                       families=["basic_arithmetic"], train_per_family=nodes, eval_per_family=4, max_length=64,
                       local_steps=1, batch_size=1, lr=5e-3, lora_r=4, lora_alpha=8, accuracy_every=0,
                       partition="iid", clip="none", out=str(out))
    patches = [(strategy.LoraStrategy, "_parse", "checks"), (records.Records, "append", "records"),
               (checkpoint, "save", "records"), (strategy.LoraStrategy, "after_round", "records")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    rows: list[dict] = []
    run_round = driver.run_round

    def timed_round(*args_, **kwargs):  # a round starts: the previous one (recorded and checkpointed) is complete
        if rows:
            rows[-1]["spent"] = timers.take()
        timers.take()
        state, result, record = run_round(*args_, **kwargs)
        rows.append({"record": record})
        return state, result, record

    try:
        for owner, name, part in patches:
            setattr(owner, name, timers.wrap(part, getattr(owner, name)))
        driver.run_round = timed_round
        run_local(config, LocalGrid(app, range(nodes), nodes, run_id=nodes))
        rows[-1]["spent"] = timers.take()  # the last round's records (the run's summary and exports are not timed)
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
        driver.run_round = run_round
        client_app.reset_worker()
    result = []
    for row in rows:
        record, spent = row["record"], row["spent"]
        parts = {"clients": spent.get("clients", 0.0), "checks": spent.get("checks", 0.0),
                 "aggregation": record["aggregation_seconds"], "records": spent.get("records", 0.0),
                 "evaluation": record.get("eval_seconds", 0.0)}
        # round_seconds ends before the round is recorded; the records' time is added to the round's wall
        wall = record["round_seconds"] + parts["records"]
        parts["messages"] = wall - sum(parts.values())
        result.append({"nodes": nodes, "round": record["round"], "accepted": len(record["client_ids"]),
                       "streamed": bool(record.get("streamed")), "wall": wall, **parts})
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); streams from {driver.STREAM_FROM} clients a round")
    print(f"{'nodes':>5} {'round':>5} {'accepted':>8} {'streamed':>8} {'wall s':>7}  "
          + "  ".join(f"{p + ' ms/client':>22}" for p in PARTS))
    rows = []
    for nodes in [int(n) for n in args.nodes.split(",")]:
        with tempfile.TemporaryDirectory() as folder:
            for row in one_run(nodes, args, Path(folder) / "run"):
                rows.append(row)
                print(f"{row['nodes']:5d} {int(row['round']):5d} {row['accepted']:8d} {str(row['streamed']):>8} "
                      f"{row['wall']:7.1f}  " + "  ".join(f"{1000 * row[p] / row['accepted']:22.1f}" for p in PARTS),
                      flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
