"""``fedmomentum run | compare | study | methods``: the command line over the simulation."""

from __future__ import annotations

import copy
import csv
import json
import warnings
from pathlib import Path
from typing import Annotated

import typer
import yaml

from . import config as config_io
from . import methods as method_registry
from . import report

app = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__,
                  context_settings={"help_option_names": ["-h", "--help"]})

ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="TOML or YAML file of RunConfig keys.")]
Rounds = Annotated[int | None, typer.Option(help="Federated rounds.")]
Clients = Annotated[int | None, typer.Option(help="Number of clients.")]
PerRound = Annotated[int | None, typer.Option(help="Clients sampled per round.")]
LocalSteps = Annotated[int | None, typer.Option(help="Optimizer steps per client per round.")]
Seed = Annotated[int | None, typer.Option(help="Seed for data, partition, sampling and init.")]
Model = Annotated[str | None, typer.Option(help="Local HF causal-LM folder (default: embedded SmolLM2-135M).")]
Device = Annotated[str | None, typer.Option(help="cpu or cuda.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Any config key: --set lr=5e-4 (repeatable).")]
Options = Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option: -o residual_energy=0.99.")]


def _parse_pairs(pairs: list[str] | None, what: str) -> dict:
    values = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} expects key=value, got {pair!r}")
        values[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return values


def _overrides(sets, options, **flags) -> dict:
    values = {k: v for k, v in flags.items() if v is not None}
    values.update(_parse_pairs(sets, "--set"))
    if options:
        values["method_options"] = {**values.get("method_options", {}), **_parse_pairs(options, "--option")}
    return values


def _fail(error: Exception) -> None:
    typer.secho(f"error: {error}", fg="red", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    config: ConfigFile = None,
    method: Annotated[str | None, typer.Option(help="Aggregation method (see `fedmomentum methods`).")] = None,
    rounds: Rounds = None,
    clients: Clients = None,
    clients_per_round: PerRound = None,
    local_steps: LocalSteps = None,
    seed: Seed = None,
    model: Model = None,
    device: Device = None,
    out: Annotated[str | None, typer.Option(help="Output folder.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder from its checkpoint.")] = None,
    export_merged: Annotated[bool, typer.Option("--export-merged", help="Also save the merged full model.")] = False,
    option: Options = None,
    set_: Sets = None,
) -> None:
    """Run one method on the federation; writes metrics.jsonl, summary.json, curves.png and the adapter."""
    from .simulation import run as run_simulation

    try:
        overrides = _overrides(set_, option, method=method, rounds=rounds, clients=clients,
                               clients_per_round=clients_per_round, local_steps=local_steps, seed=seed,
                               model=model, device=device, out=out, export_merged=export_merged or None)
        if resume is not None:
            saved = resume / "config.json"
            if not saved.is_file():
                raise FileNotFoundError(f"nothing to resume in {resume}: no config.json")
            overrides = {**json.loads(saved.read_text()), **overrides, "out": str(resume)}
        cfg = config_io.load(config, overrides)
        summary = run_simulation(cfg, resume=resume is not None)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def compare(
    methods: Annotated[str, typer.Option(help="Comma-separated methods to run on the same seeds and data.")] = (
        ",".join(method_registry.names())),
    config: ConfigFile = None,
    rounds: Rounds = None,
    clients: Clients = None,
    clients_per_round: PerRound = None,
    local_steps: LocalSteps = None,
    seed: Seed = None,
    model: Model = None,
    device: Device = None,
    out: Annotated[str, typer.Option(help="Output folder; each method gets a subfolder.")] = "runs/compare",
    target_loss: Annotated[float | None, typer.Option(help="Count rounds until eval loss ≤ this.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep finished methods in OUT; continue the others "
                                                          "from their checkpoints.")] = False,
    set_: Sets = None,
) -> None:
    """Run several methods with the same seeds, clients and data; print a table and overlay the curves."""
    from .driver import CHECKPOINT
    from .models import load_model
    from .simulation import run as run_simulation

    names = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        for name in names:
            method_registry.get(name)
        overrides = _overrides(set_, None, rounds=rounds, clients=clients, clients_per_round=clients_per_round,
                               local_steps=local_steps, seed=seed, model=model, device=device)
        base = config_io.load(config, overrides)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    summaries, curves = [], {}
    loaded = None
    for name in names:
        cfg = base.replace(method=name, method_options=base.method_options if name == base.method else {},
                           out=str(root / name))
        finished = root / name / "summary.json"
        if resume and finished.is_file() and json.loads(finished.read_text())["rounds"] == cfg.rounds:
            summary = json.loads(finished.read_text())
        else:
            if loaded is None:
                loaded = load_model(cfg.model, device=cfg.device)
            pristine = copy.deepcopy(loaded[0])  # every method starts from the same base weights
            started = resume and (root / name / CHECKPOINT).is_file()
            summary = run_simulation(cfg, model=pristine, tokenizer=loaded[1], resume=started)
        rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        summary.update(report.summarize(rows, cfg, summary["seconds"], summary["peak_rss_mb"], target_loss))
        summaries.append(summary)
        curves[name] = rows
    table = report.compare_table(summaries)
    (root / "compare.md").write_text(table + "\n")
    with (root / "compare.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summaries[0]))
        writer.writeheader()
        writer.writerows(summaries)
    report.plot_compare(curves, root / "compare.png")
    typer.echo(table)
    typer.echo(f"\nwrote {root / 'compare.md'}, {root / 'compare.csv'}, {root / 'compare.png'}")


@app.command()
def study(
    config: Annotated[Path, typer.Option("--config", "-c", help="Study file (TOML or YAML): [base], [grid], "
                                                                "[[cell]], baseline, target_loss.")],
    out: Annotated[Path, typer.Option(help="Study folder: runs/<cell>/seed-<k>, study.md, study.csv, plots.")] = (
        Path("runs/study")),
    verbose: Annotated[bool, typer.Option("--verbose", help="Print every round of every run.")] = False,
) -> None:
    """Run a grid of runs over seeds (finished runs are kept, interrupted ones resume); compare against a baseline."""
    import time

    from . import study as study_io

    try:
        spec = study_io.load(config)
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        typer.echo(line)
        with (out / "study.log").open("a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    started = time.perf_counter()
    log(f"study {spec.name}: {len(spec.cells)} cells × {len(spec.seeds)} seeds into {out}")
    results = study_io.execute(spec, out, log=log, verbose=verbose)
    written = study_io.write(spec, results, out, wall_seconds=time.perf_counter() - started)
    typer.echo((out / "study.md").read_text())
    log(f"study {spec.name}: done in {time.perf_counter() - started:.0f} s; wrote {', '.join(p.name for p in written)}")
    failed = [r for r in results if r.error is not None]
    if failed:
        typer.secho(f"{len(failed)} run(s) failed (see study.md)", fg="red", err=True)
        raise typer.Exit(1)


@app.command("methods")
def list_methods() -> None:
    """List the aggregation methods and the options each accepts."""
    for name in method_registry.names():
        exact = "exact" if method_registry.create(name).exact else "not exact"
        typer.echo(f"{name:12s} {exact:10s} options: {', '.join(method_registry.options(name))}")


def main() -> None:
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    app(prog_name="fedmomentum")


if __name__ == "__main__":
    main()
