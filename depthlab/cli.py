"""The `depthlab` command: sweep, plan, report and bench. Thin: each command calls one module."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, install_command
from .config import load_config, with_overrides
from .errors import USER_ERRORS, ConfigError, DataError, StorageError

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train plain and residual CIFAR-10 nets of growing depth and see why residual networks exist.")
console = Console(soft_wrap=True)  # long paths and messages stay on one line in logs
errors = Console(stderr=True, soft_wrap=True)

USER_ERROR = 2
RUN_ERROR = 1
PIPE_WIDTH = 10_000  # a guess that no table row reaches: in a log or a pipe each row stays on one line


def default_text(value: str) -> str:
    """'[default: …]' in a help text, escaped so that rich prints it rather than reading it as markup."""
    return escape(f"[default: {value}]")


def _version(show: bool) -> None:
    if show:
        console.print(f"depthlab {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """The options that come before a command (the app's help text is given to typer.Typer above)."""
    for output in (console, errors):  # tables wrapped at 80 columns would spread each number over three lines of a log
        output.width = None if output.is_terminal else PIPE_WIDTH


@contextmanager
def user_errors() -> Iterator[None]:
    """Mistakes in what the user gave us end with a one-line message and exit code 2, not a traceback;
    a results folder that cannot be written (full disk, read-only) with one line and exit code 1."""
    try:
        yield
    except USER_ERRORS as err:
        errors.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(USER_ERROR)
    except StorageError as err:
        errors.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(RUN_ERROR)


def _load(config: Path, data: Optional[str], device: Optional[str], jobs: Optional[int] = None,
          overrides: Optional[list[str]] = None, tensorboard: bool = False):
    return with_overrides(load_config(config, overrides or ()), data_path=data, device=device, jobs=jobs, tensorboard=tensorboard)


def _device_names(incomplete: str) -> list[str]:
    """Shell completion of --device: the fixed names and cuda:0..N-1 where torch sees N GPUs (without CUDA, cuda:0)."""
    import torch

    names = ["auto", "cpu", "cuda"] + [f"cuda:{i}" for i in range(max(1, torch.cuda.device_count()))]
    return [name for name in names if name.startswith(incomplete)]


class Executor(str, Enum):
    local = "local"
    ray = "ray"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"


class Arch(str, Enum):
    plain = "plain"
    residual = "residual"


class Shortcut(str, Enum):
    A = "A"
    B = "B"


class CompileMode(str, Enum):
    auto = "auto"
    none = "none"
    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"


ConfigArg = typer.Argument(..., help="A sweep file, e.g. configs/cifar.yaml.", show_default=False)
OutOpt = typer.Option(None, "--out", help=f"Results folder {default_text('results/<name>')}.")
DeviceOpt = typer.Option(None, "--device", autocompletion=_device_names, help="auto, cpu, cuda or cuda:N " + default_text("the config's runtime.device") + ".")
DataOpt = typer.Option(None, "--data", help="An existing CIFAR-10: the python release (cifar-10-python.tar.gz or its folder), "
                                            "an image folder train/<class>/ test/<class>/, or a .tar.gz of one.")
SetOpt = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a key of the sweep file, e.g. train.lr=0.05 or "
                                                                "grid.seed=[0,1,2] (YAML values; repeat the option).")


@app.command()
def sweep(
    config: Path = ConfigArg,
    out: Optional[Path] = OutOpt,
    device: Optional[str] = DeviceOpt,
    data: Optional[str] = DataOpt,
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help=f"Cells trained at once {default_text('chosen from the device')}."),
    force: bool = typer.Option(False, "--force", help="Retrain cells whose config changed; their old results move to superseded/."),
    executor: Executor = typer.Option(Executor.local, "--executor", help=escape(
        f"local (this machine's processes) or ray (a Ray cluster; {install_command('ray')}).")),
    address: Optional[str] = typer.Option(None, "--address", help="With --executor ray: auto or ray://HOST:PORT "
                                                                  + default_text("a Ray instance on this machine") + "."),
    gpus_per_cell: float = typer.Option(0.0, "--gpus-per-cell", min=0.0, help="With --executor ray: the GPU share each cell asks Ray for (e.g. 0.25)."),
    no_shared_fs: bool = typer.Option(False, "--no-shared-fs", help="With --executor ray: workers return each cell's files to this machine "
                                                                    "instead of writing them " + default_text("detected") + "."),
    overrides: Optional[list[str]] = SetOpt,
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved sweep (after --set) as YAML and exit without training."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help=escape(
        f"Also log every epoch to <results>/tensorboard/<cell>/ (runtime.tensorboard; {install_command('tensorboard')}).")),
) -> None:
    """Train every cell of a sweep; re-run the same command to resume after an interruption."""
    from .display import display_for
    from .results_folder import ResultsFolder
    from .tblog import events_for
    from .report import build_report, print_report, write_report
    from .sweep import default_out_dir, run_sweep

    with user_errors():
        cfg = _load(config, data, device, jobs, overrides, tensorboard)
        if print_config:
            print(cfg.to_yaml(), end="")
            return
        out_dir = out or default_out_dir(cfg)
        remote = _executor(executor, address, gpus_per_cell, no_shared_fs)
        try:
            with display_for(console) as display, events_for(display, cfg, out_dir) as events:
                outcome = run_sweep(cfg, out_dir, events, force=force, executor=remote)
        except KeyboardInterrupt:
            errors.print(f"\ninterrupted: finished cells are kept and the others continue from their last epoch when you run "
                         f"the same command again (results in {out_dir})")
            raise typer.Exit(130)
        for path in outcome.superseded:
            console.print(f"moved stale results to {path}")
        if outcome.skipped and not outcome.ran:
            console.print(f"all {len(outcome.skipped)} cells already finished in {out_dir}")
        report = build_report(out_dir)
        written = write_report(report, out_dir)
        print_report(report, console)
        console.print("wrote " + ", ".join(str(p) for p in written))
    if outcome.failed:
        log = ResultsFolder(outcome.out_dir).cell("<id>").error_log
        errors.print(f"[red]{len(outcome.failed)} cell(s) failed:[/red] {', '.join(outcome.failed)} (see {log})", highlight=False)
        raise typer.Exit(1)


def _executor(name: Executor, address: Optional[str], gpus_per_cell: float, no_shared_fs: bool):
    """None for this machine's own worker processes, or the Ray executor (Ray imported only then)."""
    if name is Executor.local:
        return None
    from .ray_executor import RayExecutor, import_ray

    import_ray()
    return RayExecutor(address=address, gpus_per_cell=gpus_per_cell, filesystem="none" if no_shared_fs else "detect")


@app.command()
def plan(
    config: Path = ConfigArg,
    out: Optional[Path] = OutOpt,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of cells."),
    estimate: bool = typer.Option(False, "--estimate", help="Time a few steps of each model on this device and project the wall time."),
    device: Optional[str] = DeviceOpt,
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="Cells at once, for the estimate " + default_text("the config's runtime.jobs") + "."),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """List the cells a sweep will run, with parameters, multiply-accumulates and training compute."""
    from .plan import compute_text, make_plan
    from .sweep import default_out_dir

    def progress(line: str) -> None:  # stderr, so that --json stays one JSON document on stdout
        errors.print(line, markup=False, highlight=False)

    with user_errors():
        cfg = _load(config, None, device, overrides=overrides)
        result = make_plan(cfg, out or default_out_dir(cfg), estimate=estimate, jobs=jobs, progress=progress)
    rows, projection = result.rows, result.projection
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{cfg.name}: {len(rows)} cells")
    table.add_column("cell", no_wrap=True)
    for column in ("params", "MACs", "iters", "epochs", "compute", "status"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["id"], f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}M", f"{r['iterations']:,}", f"{r['epochs']:.1f}",
                      compute_text(r["train_flops"]), r["status"])
    console.print(table)
    console.print(f"total training compute: {compute_text(sum(r['train_flops'] for r in rows))}")
    if projection:
        console.print(f"estimated wall time on {cfg.runtime.device}: {_minutes(projection, 'serial_seconds')} one cell at a time, "
                      f"about {_minutes(projection, 'wall_seconds')} with {projection['jobs']} at once (if they scale linearly); "
                      f"± is the spread over {projection['repeats']} timings; this assumes an idle machine, "
                      "both now and while the sweep runs")


def _minutes(projection: dict, key: str) -> str:
    """'13.0 ± 2.1 min' from a projection's seconds and their spread."""
    return f"{projection[key] / 60:.1f} ± {projection[key + '_spread'] / 60:.1f} min"


class FigureFormat(str, Enum):
    png = "png"
    svg = "svg"
    pdf = "pdf"


class Format(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


def _latest_results(root: Path = Path("results")) -> Path:
    from .errors import ReportError
    from .results_folder import latest_results

    latest = latest_results(root)
    if latest is None:
        raise ReportError(f"no sweep results under {root}/: run `depthlab sweep CONFIG` first, or name a results folder")
    return latest


@app.command()
def report(
    results: Optional[Path] = typer.Argument(None, help=f"A sweep's results folder {default_text('the latest under results/')}."),
    fmt: Format = typer.Option(Format.text, "--format", help="text (tables and verdict), json, or markdown."),
    figure_format: FigureFormat = typer.Option(FigureFormat.png, "--figure-format",
                                               help="Also write each figure as svg or pdf (beside the PNGs report.md shows)."),
) -> None:
    """Training-error tables (plain vs residual per depth), the verdict, and a Figure-6-style plot."""
    from .report import build_report, print_report, report_json, report_markdown, write_report

    with user_errors():
        folder = results or _latest_results()
        rep = build_report(folder)
    try:
        written = write_report(rep, folder, figure_format.value)
    except OSError as err:  # a read-only or full results folder: the report itself still goes to stdout
        written = []
        errors.print(f"note: report files not written to {folder} ({err.strerror or err}); printing the report only",
                     markup=False, highlight=False)
    wrote = "wrote " + ", ".join(str(p) for p in written)
    if fmt is Format.text:
        print_report(rep, console)
        if written:
            console.print(wrote)
        return
    print(json.dumps(report_json(rep), indent=2) if fmt is Format.json else report_markdown(rep))
    if written:  # stderr: stdout stays the JSON or markdown document alone
        errors.print(wrote, markup=False, highlight=False)


@app.command()
def bench(
    arch: Arch = typer.Option(Arch.residual, help="plain or residual."),
    depth: int = typer.Option(56, help="A depth 6n+2."),
    shortcut: Shortcut = typer.Option(Shortcut.A, help="A or B."),
    batch_size: int = typer.Option(128, min=1, help="Images per step."),
    precision: Precision = typer.Option(Precision.fp32, help="fp32, bf16 or auto (bf16 where the hardware computes it)."),
    steps: int = typer.Option(100, min=1, help="Timed steps per measurement."),
    warmup: int = typer.Option(20, min=0, help="Untimed steps first (compilation, cudnn autotuning)."),
    jobs: int = typer.Option(4, min=1, help="Cells at once for the concurrent measurement (1 skips it)."),
    device: str = typer.Option("auto", autocompletion=_device_names, help="auto, cpu, cuda or cuda:N."),
    compile_mode: CompileMode = typer.Option(CompileMode.auto, "--compile", help="auto, none, default, reduce-overhead or max-autotune."),
    loader_workers: Optional[int] = typer.Option(None, min=0, help=f"DataLoader workers of the common-way baseline {default_text('min(4, CPU cores)')}."),
    baseline: bool = typer.Option(True, help="Measure the common-way baseline too."),
    as_json: bool = typer.Option(False, "--json", help="Print the measurements as JSON."),
    compare: bool = typer.Option(False, "--compare", help="Instead: time fp32 and bf16, NCHW and channels_last, and show what auto picks here."),
    group: list[int] = typer.Option([], "--group", min=1, help="Instead: one cell, K cells as K processes and K seeds as one grouped model, for each K given (repeatable)."),
) -> None:
    """Images/s: the common DataLoader way vs depthlab's single-cell path vs K cells at once."""
    from .bench import BenchOptions, BenchWorkerError, compare_paths, group_bench, run_bench

    options = BenchOptions(arch=arch.value, depth=depth, shortcut=shortcut.value, batch_size=batch_size, precision=precision.value,
                           steps=steps, warmup=warmup, jobs=jobs, device=device, compile=compile_mode.value, baseline=baseline,
                           **({} if loader_workers is None else {"loader_workers": loader_workers}))
    with user_errors():
        options.cell()
        try:
            result = group_bench(options, group) if group else compare_paths(options) if compare else run_bench(options)
        except BenchWorkerError as err:
            errors.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(RUN_ERROR)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    if group:
        _print_groups(result)
        return
    if compare:
        _print_paths(result)
        return
    console.print(f"{result['model']} batch {batch_size} {precision.value} on {result['device_name']} ({result['device']}), torch {result['torch']}, "
                  f"compile: {result['compile']}, {steps} timed steps")
    for key, label in (("common_way", "common way (DataLoader + PIL, eager fp32)"), ("single_cell", "depthlab, one cell"),
                       ("concurrent", f"depthlab, {jobs} cells at once (aggregate)")):
        if key in result:
            ratio = f"  ({result[key + '_speedup']:.2f}× baseline)" if key + "_speedup" in result else ""
            console.print(f"  {label:<45} {result[key]:>10,.0f} images/s{ratio}")
    ran = result["single_cell_execution"]
    console.print(f"  depthlab's step ran {ran['execution']}: {ran['dynamo_graphs']} graph(s), {ran['eager_steps']} eager step(s), "
                  f"{ran['cudagraph_skips']} CUDA-graph skip(s) (--json for the reasons)", highlight=False)


def _print_groups(result: dict) -> None:
    """bench --group as a table: images/s per net and in aggregate, K processes against K seeds grouped."""
    console.print(f"{result['model']} batch {result['batch_size']} {result['precision']} on {result['device_name']} ({result['device']}), "
                  f"torch {result['torch']}, compile: {result['compile']}, {result['steps']} timed steps; one cell: "
                  f"{result['one_cell']:,.0f} images/s", highlight=False)
    console.print(f"  {'K':>3} {'K processes: per net':>22} {'aggregate':>10} {'grouped: per net':>18} {'aggregate':>10} {'grouped/processes':>18}")
    for row in result["groups"]:
        console.print(f"  {row['k']:>3} {row['processes_per_net']:>22,.0f} {row['processes']:>10,.0f} {row['grouped_per_net']:>18,.0f} "
                      f"{row['grouped']:>10,.0f} {row['grouped_over_processes']:>17.2f}×", highlight=False)


def _print_paths(result: dict) -> None:
    console.print(f"{result['model']} batch {result['batch_size']} on {result['device_name']} ({result['device']}, "
                  f"{result['cpu_threads']} threads), torch {result['torch']}, compile: {result['compile']}, {result['steps']} timed steps")
    for path in result["paths"]:
        label = f"{path['precision']} {path['memory_format']}"
        chosen = "  ← auto" if path["auto"] else ""
        console.print(f"  {label:<20} {path['images_per_second']:>8,.0f} images/s  ({path['speedup']:.2f}×){chosen}")


def _probe_variant(text: str) -> dict:
    """`--variant norm=none,init=skipinit` as NetSpec options; a ConfigError names what is wrong."""
    from .config import NET_KEYS
    from .options import NetSpec, net_spec_error

    options: dict = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in NET_KEYS or not value:
            raise ConfigError("--variant", "", f"expected KEY=VALUE[,KEY=VALUE] with KEY one of {', '.join(NET_KEYS)}; got {item!r}")
        try:
            options[key] = float(value) if key == "shortcut_scale" else value
        except ValueError:
            raise ConfigError("--variant", "", f"shortcut_scale must be a number; got {value!r}") from None
    problems = [net_spec_error(NetSpec(arch, 8, **options)) for arch in ("plain", "residual")]
    if all(problems):
        raise ConfigError("--variant", "", f"{text}: {problems[1]}")
    return options


def _probe_cell(cell: Path, result, lesions: list[dict], source, fmt: "Format") -> None:
    """A trained cell's probe: the lesion table and its gradient measures."""
    payload = {"cell": str(cell), **source.as_dict(), "loss": result.loss, "logit_std": result.logit_std,
               "grad_ratio": result.grad_ratio, "rel_grad_ratio": result.rel_grad_ratio,
               "nearby_gradient_correlation": result.nearby_gradient_correlation, "nearby_by_lag": result.nearby_by_lag,
               "unrelated_image_gradient_cosine": result.unrelated_image_gradient_cosine,
               "gradient_correlation": result.unrelated_image_gradient_cosine,  # the same number under its former key
               "blocks": result.blocks, "lesion": lesions}
    if fmt is Format.json:
        print(json.dumps(payload, indent=2, default=float))
        return
    table = Table(title=f"{escape(cell.name)}: test of removing one block (error % on the probed batch)\n{escape(source.line())}")
    for column in ("removed", "error %", "loss"):
        table.add_column(column)
    for row in lesions:
        error = "not removable" if row["error"] is None else f"{row['error']:.2f}"
        loss = "" if row["loss"] is None else f"{row['loss']:.3f}"
        table.add_row(str(row["removed"] or "(intact)"), error, loss)
    console.print(table)
    console.print(f"relative gradient ratio first/last conv {result.rel_grad_ratio:.3g}; nearby-input gradient correlation "
                  f"{result.nearby_gradient_correlation:.4f}; unrelated images' gradient cosine {result.unrelated_image_gradient_cosine:.4f}")


PROBE_SHOWN = ["arch", "variant", "depth", "logit_std", "rel_grad_ratio", "grad_ratio", "nearby_gradient_correlation",
               "nearby_gradient_correlation_far", "unrelated_image_gradient_cosine", "branch_ratio", "act_std_last"]


@app.command()
def probe(
    arch: list[str] = typer.Option(["plain", "residual"], "--arch", help="plain and/or residual (repeat the option)."),
    depth: list[int] = typer.Option([8, 20, 56, 110], "--depth", help="Depths 6n+2 (repeat the option)."),
    variant: list[str] = typer.Option([], "--variant", help="Also probe an ablation, e.g. norm=none,init=skipinit (repeat the option)."),
    cell: Optional[Path] = typer.Option(None, "--cell", help="Probe a finished cell's weights (results/<name>/cells/<id>) and remove one block at a time."),
    data: Optional[str] = DataOpt,
    batch_size: int = typer.Option(128, "--batch-size", min=2, help="Images in the probed batch."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the initial weights and of the batch drawn."),
    out: Path = typer.Option(Path("results/probe"), "--out", help="Folder for probe.csv, shattering.csv and probe.png."),
    fmt: Format = typer.Option(Format.text, "--format", help="text, json or markdown."),
) -> None:
    """Why plain nets degrade: gradients, logit scale, residual-branch size and shattered gradients, per depth."""
    from .config import DataSpec
    from .options import ARCHS, depth_error
    from .probe import ProbeSource, decay_table, probe_batch, probe_depths, probe_figure, probe_trained
    from .attempt import storage_errors

    with user_errors():
        for a in arch:
            if a not in ARCHS:
                raise ConfigError("--arch", "", f"expected one of {', '.join(ARCHS)}, got {a!r}")
        for d in depth:
            problem = depth_error(d)
            if problem:
                raise ConfigError("--depth", "", problem)
        variants = [{}] + [_probe_variant(v) for v in variant]
        spec = DataSpec(source="cifar10", path=data) if data else DataSpec(source="synthetic")
        source = ProbeSource.of(data, batch_size, seed)
        if source.synthetic:
            errors.print(f"[bold yellow]warning:[/] {escape(source.data)}; pass --data PATH for real images", highlight=False)
        try:
            batch = probe_batch(spec, batch_size, seed)
        except ValueError as err:
            raise DataError(str(err)) from None
        if cell is not None:
            try:
                result, lesions = probe_trained(cell, batch)
            except FileNotFoundError as err:
                raise DataError(str(err)) from None
    if cell is not None:
        _probe_cell(cell, result, lesions, source, fmt)
        return
    frame = probe_depths(arch, depth, batch=batch, seed=seed, variants=variants)
    scalars = frame.drop(columns=["nearby_by_lag"]).assign(**source.as_dict())
    with user_errors(), storage_errors(out, advice="free space or make the folder writable, or use another --out"):
        out.mkdir(parents=True, exist_ok=True)
        scalars.to_csv(out / "probe.csv", index=False)
        decay_table(frame).to_csv(out / "shattering.csv", index=False)
        probe_figure(frame, source).savefig(out / "probe.png", dpi=120)
    shown = frame[PROBE_SHOWN]
    if fmt is Format.json:
        print(json.dumps([{**row, **source.as_dict()} for row in frame.to_dict(orient="records")], indent=2, default=float))
    elif fmt is Format.markdown:
        print(f"At initialisation, on {source.line()}.\n")
        print("| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns))
        for _, row in shown.iterrows():
            print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    else:
        table = Table(title=f"at initialisation, on one batch: {escape(source.line())}")
        for column in shown.columns:
            table.add_column(column, justify="right")
        for _, row in shown.iterrows():
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
        console.print(table)
        console.print(f"wrote {out / 'probe.csv'}, {out / 'shattering.csv'}, {out / 'probe.png'}")


def main() -> None:
    app(prog_name="depthlab")


if __name__ == "__main__":
    sys.exit(main())
