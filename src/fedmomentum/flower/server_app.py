"""The Flower ServerApp: builds the run's config from Flower's run config and starts ``LoraStrategy``.

Run config keys (``[tool.flwr.app.config]`` in the app's ``pyproject.toml``, or ``flwr run --run-config``; Flower
accepts only keys the app declares, and the example app declares all of these):

- any ``RunConfig`` field, with ``-`` or ``_`` (``local-steps = 4``); list fields take a comma-separated string
  (``families = "basic_arithmetic,chain_sum"``), method options a nested table
  (``[tool.flwr.app.config.method-options]`` → ``method-options.residual_energy = 0.99``). An empty string
  means "not set": the config file's value, else ``RunConfig``'s default (a list field: the empty list);
- ``config-file``: a TOML/YAML file of ``RunConfig`` keys on the server. Precedence: ``RunConfig`` defaults, the
  app's ``pyproject.toml``, the config file, then the keys given explicitly with ``--run-config``;
- Flower-only: ``min-clients`` (default 1), ``round-timeout`` (seconds, default 3600), ``node-timeout`` (seconds to
  wait for the sampled partitions' nodes, default 60), ``resume`` (continue from the checkpoint in ``out``, or
  start over when the run stopped before its first checkpoint), ``overwrite`` (delete the run already in ``out``
  and start over; without it a new run refuses a folder that holds files), ``eval-data`` (the server's held-out
  data: a file or folder on the server, ``none`` for no evaluation, empty for the config's seeded held-out
  examples), ``max-examples`` and ``max-factor-abs`` (limits on what a reply may claim, see ``replies.Limits``),
  ``node-keys`` (a file on the server binding each partition to a SuperNode's public key, see ``identity``) and
  ``handover-after`` (rounds a holder may miss before a waiting node takes its partition, default 2; 0 = never).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection
from logging import ERROR
from pathlib import Path

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from ..config import FIELDS, RunConfig, from_dict, merge
from ..config import read as read_config
from .replies import Limits
from .strategy import LoraStrategy, failure_allowed, write_failure

STRATEGY_KEYS = {"min-clients": ("min_clients", int), "round-timeout": ("round_timeout", float),
                 "node-timeout": ("node_timeout", float), "eval-data": ("eval_data", str),
                 "overwrite": ("overwrite", bool), "node-keys": ("node_keys", str),
                 "handover-after": ("handover_after", int)}
LIMIT_KEYS = {"max-examples": ("max_examples", int), "max-factor-abs": ("max_abs", float)}
FLOWER_KEYS = (*STRATEGY_KEYS, *LIMIT_KEYS, "resume", "config-file")


def _list_field(name: str) -> bool:
    field = FIELDS[name]
    return field.default_factory is not dataclasses.MISSING and isinstance(field.default_factory(), list)


def _field_value(name: str, value: object) -> object:
    if _list_field(name) and isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if name == "method_options" and isinstance(value, str):
        return yaml.safe_load(value) or {}
    if name == "model" and value == "default":
        return None
    return value


def parse_run_config(values: dict, explicit: Collection[str] | None = None) -> tuple[RunConfig, dict, bool]:
    """``(RunConfig, strategy options, resume)`` from a Flower run config (a flat ``UserConfig`` mapping).

    ``explicit`` names the keys given with ``--run-config`` (``Run.override_config``); they win over a
    ``config-file``, which wins over the others (the app's defaults). ``None``: every key is explicit.
    """
    explicit = set(values) if explicit is None else set(explicit)
    defaults: dict = {}
    chosen: dict = {}
    options: dict = {}
    limits: dict = {}
    resume = False
    base = None
    for key, value in values.items():
        name = key.replace("-", "_")
        if key in STRATEGY_KEYS:
            option, kind = STRATEGY_KEYS[key]
            options[option] = kind(value)
        elif key in LIMIT_KEYS:
            option, kind = LIMIT_KEYS[key]
            limits[option] = kind(value)
        elif key == "resume":
            resume = bool(value)
        elif key == "config-file":
            base = str(value) or None
        elif value == "" and not (name in FIELDS and _list_field(name)):
            continue  # not set
        elif name.startswith("method_options."):
            target = chosen if key in explicit else defaults
            target.setdefault("method_options", {})[name.split(".", 1)[1]] = value
        elif name in FIELDS:
            (chosen if key in explicit else defaults)[name] = _field_value(name, value)
        else:
            from_dict({name: value})  # raises the unknown-key error with a suggestion
    if limits:
        options["limits"] = Limits(**limits)
    from_file = {}
    if base:
        if not Path(base).is_file():
            raise FileNotFoundError(f"config-file {base!r} not found on the server (give an absolute path: it is "
                                    f"read in the ServerApp's working directory, {Path.cwd()})")
        from_file = read_config(base)
    run_config = from_dict(merge(defaults, from_file, chosen))
    run_config.validate()
    return run_config, options, resume


def _explicit_keys(grid: Grid) -> set[str] | None:
    """The keys given with ``flwr run --run-config`` (``None`` when the grid does not say)."""
    try:
        return set(grid.run.override_config)
    except Exception:  # a grid without run information (tests, older Flower)
        return None


def make_server_app(config: RunConfig | None = None, *, resume: bool = False, **options) -> ServerApp:
    """A ServerApp running ``config`` (or, when omitted, the run config Flower gives it).

    A failure leaves ``summary.json`` saying ``"status": "failed"`` and why (a bad run config or option too, unless
    ``out`` holds another run), then ends the ServerApp with an error (Flower marks the run failed).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        began = time.time()
        out = str(config.out or f"runs/flower-{config.method}") if config is not None else \
            str(context.run_config.get("out") or "")
        try:
            if config is None:
                run_config, strategy_options, resume_run = parse_run_config(dict(context.run_config),
                                                                            _explicit_keys(grid))
                out = run_config.out or f"runs/flower-{run_config.method}"
            else:
                run_config, strategy_options, resume_run = config, {}, resume
            strategy = LoraStrategy(run_config, **{**strategy_options, **options})
        except Exception as error:
            if out and failure_allowed(Path(out), began):
                write_failure(Path(out), None, error)
            else:
                log(ERROR, "bad run config: %s", error)
            raise
        strategy.start(grid, resume=resume_run)

    return app


app = make_server_app()

__all__ = ["FLOWER_KEYS", "app", "make_server_app", "parse_run_config"]
