"""The in-process engine: one shared base model, the sampled clients trained one after another.

Each client trains from the global adapter on the shared model (its factors are swapped in, the model is never
copied); the driver (``driver.run``) does the rest of the round. A client of another LoRA rank (``client_ranks``)
trains a PEFT adapter of its rank added beside the run's own, on the same model; what a method keeps on the
clients between rounds (FedSA-LoRA's ``B``) comes from the server's state (``ServerState.clients``). With
``straggler_rate``, a sampled client may be a straggler (it trains now, its update is returned as late and the driver
aggregates it ``straggler_delay`` rounds later) or busy with an earlier round's late update (it does not train):
``schedule.participation``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm.auto import tqdm

from .build import Setup, client_examples, client_id, client_ids, encode_all, prepare
from .client import train_round
from .config import RunConfig, default_out
from .driver import ClientRound, Engine, folded
from .driver import run as drive
from .evaluate import mixtures
from .schedule import client_ranks, client_seed, participation
from .state import ServerState
from .types import ClientUpdate


class InProcess(Engine):
    """Trains each sampled client in this process, on the server's own model."""

    features = frozenset({"start", "client_state", "client_ranks", "stream", "stragglers"})

    def __init__(self, setup: Setup, client_data: list[list[dict]], ids: list[str] | None = None,
                 quiet: bool = False):
        self.setup, self.client_data = setup, client_data
        self.ids = ids or [client_id(index) for index in range(len(client_data))]
        self.ranks = client_ranks(setup.config)
        self.quiet = quiet

    def train_round(self, t: int, state: ServerState, trainable: dict[str, bool], lr: float,
                    fold: Callable[[ClientUpdate], None] | None = None) -> ClientRound:
        config, model, method = self.setup.config, self.setup.model, self.setup.method
        plan = participation(config, t)
        training = sorted(plan.fresh + plan.late)
        updates, losses, late, late_losses = [], [], [], []
        steps = tqdm(total=len(training) * config.local_steps, desc=f"round {t}", unit="step", leave=False,
                     disable=self.quiet or not sys.stderr.isatty())
        with steps:
            for client in training:
                client_id = self.ids[client]
                update, loss = train_round(model, method, self.client_data[client], state.lora, trainable,
                                           config.train_config(), rank=self.ranks[client],
                                           own=state.clients.get(client_id), control=state.control, t=t, lr=lr,
                                           seed=client_seed(config, t, client), client_id=client_id,
                                           pad_id=self.setup.tokenizer.pad_token_id, on_step=steps.update,
                                           method_state=state.method)
                if client in plan.late:  # a straggler: the driver holds its update until it arrives
                    late.append(update)
                    late_losses.append(loss)
                    continue
                if fold is not None:  # a streamed round: into the aggregate, and only the rest is kept
                    fold(update)
                    update = folded(update)
                updates.append(update)
                losses.append(loss)
        record = {"stragglers": len(plan.late) + len(plan.dropped)} if config.straggler_rate > 0 else {}
        return ClientRound(updates, losses + late_losses, record, late=late, busy=len(plan.busy))


def engine(config: RunConfig, model=None, tokenizer=None, quiet: bool = False) -> tuple[Setup, InProcess]:
    """The server's setup and the in-process engine for ``config`` (the model is loaded unless given)."""
    parts, held_out = client_examples(config)
    setup = prepare(default_out(config), model, tokenizer, held_out)
    setup.client_mixtures = mixtures(parts, client_ids(config))
    return setup, InProcess(setup, [encode_all(part, setup.tokenizer, config) for part in parts], client_ids(config),
                            quiet=quiet)


def run(config: RunConfig, *, model=None, tokenizer=None, resume: bool = False, overwrite: bool = False,
        quiet: bool = False) -> dict:
    """Run (or continue) a federated fine-tuning job in this process; writes its records into ``config.out``
    (a new run refuses a folder holding files unless ``overwrite``, see ``driver.run``)."""
    return drive(*engine(config, model, tokenizer, quiet), resume=resume, overwrite=overwrite, quiet=quiet)
