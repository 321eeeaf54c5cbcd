"""How far one attacker among four Flower nodes moves the model, with and without clipping.

Each attack is a real ClientApp (``tests/flower_helpers.py``: ``faulty_client_app``) through Flower's wire format
in this process (``LocalGrid``), on the tiny random Llama: four nodes, four clients a round (iid, so equal example
counts), two rounds. The clean run is the same four nodes all honest (``fedmomentum run``, the same numbers). For
each attack it prints the distance of the final model ``W + s B A`` (adapted layers, Frobenius) from the clean run's,
the stated bound ``Σ_t p (k + 1) m_t`` (``p = 1/4``, ``m_t`` the round's median update norm), and whether every
honest reply was accepted in every round; ``--unclipped`` repeats each attack with ``clip = "none"``.

    .venv/bin/python benchmarks/attacks.py
    .venv/bin/python benchmarks/attacks.py --k 2 --unclipped
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import SMALL  # noqa: E402
from fedmomentum import build, checkpoint, driver, simulation  # noqa: E402
from fedmomentum.config import RunConfig  # noqa: E402
from fedmomentum.peft_io import get_backbone  # noqa: E402
from fedmomentum.records import read_metrics  # noqa: E402
from flower_helpers import FLOWER, LocalGrid, faulty_client_app, run_local  # noqa: E402

ATTACKS = ("poison-9999", "scaled-30", "examples-1e7", "zeros", "replay", "huge-reply", "loss-1e308")
HONEST = {"client-0", "client-1", "client-2"}


def effective(folder: Path, scaling: float) -> dict[str, torch.Tensor]:
    state = checkpoint.load(folder / driver.CHECKPOINT)[0]
    return {name: state.backbone[name].double() + scaling * state.lora[name].B.double() @ state.lora[name].A.double()
            for name in state.lora}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[name] - b[name]).norm()) ** 2 for name in a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=float, default=RunConfig().clip_k)
    parser.add_argument("--unclipped", action="store_true", help="also each attack with clip='none'")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        def config(name: str, **changes) -> RunConfig:
            return RunConfig(**{**SMALL, **FLOWER, "clients": 4, "clients_per_round": 4, "partition": "iid",
                                "train_per_family": 16, "accuracy_per_family": 0, "clip_k": args.k,
                                "out": str(Path(root) / name), **changes})

        clean = config("clean")
        simulation.run(clean, quiet=True)
        scaling = clean.lora_alpha / clean.lora_r
        reference = effective(Path(clean.out), scaling)
        start = {k: v.double() for k, v in get_backbone(build.peft_model(clean)[0]).items()}
        print(f"clean run: the model moved {distance(reference, start):.4f} in 2 rounds (k = {args.k:g})\n")
        print("| attack | clip | distance from the clean run | stated bound | honest replies accepted |")
        print("|---|---|---|---|---|")
        for attack in args.attacks:
            for clip in ("median", "none") if args.unclipped else ("median",):
                attacked = config(f"{attack}-{clip}", clip=clip)
                run_local(attacked, LocalGrid(faulty_client_app({3: attack}), range(4), 4, run_id=21))
                rows = read_metrics(attacked.out)[1:]
                bound = sum(0.25 * (args.k + 1) * statistics.median(r["update_norms"].values()) for r in rows)
                honest = all(HONEST <= set(r["client_ids"]) for r in rows)
                gap = distance(effective(Path(attacked.out), scaling), reference)
                print(f"| {attack} | {clip} | {gap:.4g} | {bound:.4g} | {'yes' if honest else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
