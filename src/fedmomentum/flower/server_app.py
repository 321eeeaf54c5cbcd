"""The Flower ServerApp: builds the run's config from Flower's run config and starts ``LoraStrategy``.

Run config keys (``[tool.flwr.app.config]`` in the app's ``pyproject.toml``, or ``flwr run --run-config``):

- any ``RunConfig`` field, with ``-`` or ``_`` (``local-steps = 4``); list fields take a comma-separated string
  (``families = "basic_arithmetic,chain_sum"``), method options a nested table
  (``[tool.flwr.app.config.method-options]`` → ``method-options.residual_energy = 0.99``);
- ``config-file``: a TOML/YAML file of ``RunConfig`` keys, read first (the keys above override it);
- Flower-only: ``min-clients`` (default 1), ``round-timeout`` (seconds, default 3600), ``node-timeout`` (seconds to
  wait for the sampled partitions' nodes to connect, default 60), ``resume`` (continue from the checkpoint
  in ``out``) and ``overwrite`` (delete the run already in ``out`` and start over; without it a new run refuses a
  folder that holds files).
"""

from __future__ import annotations

import dataclasses

import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..config import FIELDS, RunConfig, from_dict
from ..config import load as load_config
from .strategy import LoraStrategy

STRATEGY_KEYS = {"min-clients": ("min_clients", int), "round-timeout": ("round_timeout", float),
                 "node-timeout": ("node_timeout", float), "overwrite": ("overwrite", bool)}


def _list_field(name: str) -> bool:
    field = FIELDS[name]
    return field.default_factory is not dataclasses.MISSING and isinstance(field.default_factory(), list)


def parse_run_config(values: dict) -> tuple[RunConfig, dict, bool]:
    """``(RunConfig, strategy options, resume)`` from a Flower run config (a flat ``UserConfig`` mapping)."""
    config: dict = {}
    options: dict = {}
    resume = False
    method_options: dict = {}
    base = None
    for key, value in values.items():
        name = key.replace("-", "_")
        if key in STRATEGY_KEYS:
            option, kind = STRATEGY_KEYS[key]
            options[option] = kind(value)
        elif key == "resume":
            resume = bool(value)
        elif key == "config-file":
            base = str(value) if value else None
        elif name.startswith("method_options."):
            method_options[name.split(".", 1)[1]] = value
        elif name in FIELDS:
            if _list_field(name) and isinstance(value, str):
                value = [item.strip() for item in value.split(",") if item.strip()]
            elif name == "method_options" and isinstance(value, str):
                value = yaml.safe_load(value) or {}
            elif name == "model" and value in ("", "default"):
                value = None
            config[name] = value
        else:
            from_dict({name: value})  # raises the unknown-key error with a suggestion
    if method_options:
        config["method_options"] = {**config.get("method_options", {}), **method_options}
    run_config = load_config(base, config) if base else from_dict(config)
    run_config.validate()
    return run_config, options, resume


def make_server_app(config: RunConfig | None = None, *, resume: bool = False, **options) -> ServerApp:
    """A ServerApp running ``config`` (or, when omitted, the run config Flower gives it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if config is None:
            run_config, strategy_options, resume_run = parse_run_config(dict(context.run_config))
        else:
            run_config, strategy_options, resume_run = config, {}, resume
        strategy = LoraStrategy(run_config, **{**strategy_options, **options})
        strategy.start(grid, resume=resume_run)

    return app


app = make_server_app()

__all__ = ["app", "make_server_app", "parse_run_config"]
