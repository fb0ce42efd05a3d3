"""One figure and one table from the runs of a sweep: the metric of every variant against ACT iterations and
against training seconds, the seeds of a variant as a band, and per variant the mean and spread of the
metric at the end, at equal iterations and at equal wall time.

    python -m act_lightning.report multirun/reproduce-mini --out reports/reproduce_mini

A variant is a job's command-line overrides without `seed` (and without the settings that only say how
a job runs: threads, paths, the launcher); its seeds are its repeats. Overrides and seed are those of the
launch that started the job, as its checkpoint records them (later launches into its folder change
nothing). Each job's `metric_summary.json`
(written by the evaluation callback) holds the metric at every evaluation with the training seconds so
far (wall-clock time since the first iteration, evaluations excluded). Writes OUT.png, OUT.md (the table
in Markdown, with the machine it ran on and what the jobs trained with: this library's version and commit,
torch, ..., as each job's checkpoint records its latest launch) and OUT.json (every number of the table and
the curves).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from act_lightning.checkpoints import read_checkpoint, run_start
from act_lightning.environment import describe, latest_environment

# Overrides that say how a job runs, not what it trains: they never make a variant.
IGNORED = (
    "seed",
    "threads",
    "compile_cache",
    "run_dir",
    "resume",
    "paths.",
    "hydra.",
    "data.root",
    "ablation",
    "stop_after",
    "init_sweep",
)


@dataclass
class Run:
    path: Path
    seed: int
    iterations: list[int]
    values: list[float]
    seconds: list[float]
    references: dict[str, float]
    pretrain_seconds: float = 0.0  # the training seconds of the run its init_from came from (in `seconds`)
    environment: dict | None = None  # what its latest launch trained with; None where nothing recorded it
    planned: int | None = None  # the iterations its config asks for (None: not recorded)

    @property
    def finished(self) -> bool:
        """Evaluated at the end its config asks for (a run still training, or stopped, is not)."""
        return self.planned is None or (bool(self.iterations) and self.iterations[-1] >= self.planned)


@dataclass
class Variant:
    label: str
    runs: list[Run] = field(default_factory=list)


def what_varies(overrides: list[str]) -> list[str]:
    """A job's overrides that can make a variant: 'variant=ct' -> 'ct'; seeds and run settings dropped."""
    kept = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key == "seed" or any(key == p.rstrip(".") or key.startswith(p) for p in IGNORED):
            continue
        kept.append(item.lstrip("+").removeprefix("variant="))
    return sorted(kept)  # the same settings in any order on the command line are one variant


def variant_labels(jobs: list[list[str]]) -> list[str]:
    """Each job's label: the overrides that are not the same in every job (those shared by all, such as
    debug=smoke, say nothing about the variant); 'defaults' for a job with none of them."""
    kept = [what_varies(o) for o in jobs]
    shared = set.intersection(*map(set, kept)) if kept else set()
    labels = [", ".join(x for x in k if x not in shared) for k in kept]
    if len(set(labels)) == 1:  # one variant: name it by all it set
        labels = [", ".join(k) for k in kept]
    return [label or "defaults" for label in labels]


def job_checkpoint(job: Path) -> dict | None:
    """The job's `checkpoints/last.ckpt` (memory-mapped), or None before its first save."""
    last = job / "checkpoints" / "last.ckpt"
    return read_checkpoint(last, "the job's checkpoint", mmap=True) if last.is_file() else None


def job_record(job: Path, checkpoint: dict | None = None) -> tuple[list[str], dict]:
    """A job's command-line overrides and config. Both come from its checkpoint (`job_checkpoint`, read
    here unless given): the config it trained with and the launch that started it, whatever later launches
    into its folder were given. A job with no checkpoint yet reads its latest launch's Hydra record
    (`.hydra/launches/`: the one training it; an earlier one was refused, or stopped before any save), one
    whose checkpoint's history lacks its first launch the first record, and one from before launches were
    kept apart its `.hydra/` folder."""
    overrides, config = None, None
    checkpoint = checkpoint if checkpoint is not None else job_checkpoint(job)
    if checkpoint is not None:
        config = checkpoint.get("act_config")
        first = run_start(checkpoint.get("act_history"))
        overrides = first.get("overrides") if first.get("iteration") == 0 or first.get("new_run") else None
    if overrides is None or config is None:
        launches = sorted((job / ".hydra" / "launches").glob("*/overrides.yaml"))
        # without a checkpoint, the launch training it; with one whose history predates the first
        # launch's entry, the first
        record = (launches or [job / ".hydra" / "overrides.yaml"])[0 if checkpoint is not None else -1]
        if not record.is_file():
            raise FileNotFoundError(
                f"{job}: holds neither a checkpoint nor a Hydra record (.hydra/launches/*/overrides.yaml): "
                "not a job of a multirun of act_lightning.train"
            )
        if overrides is None:
            overrides = yaml.safe_load(record.read_text()) or []
        if config is None:
            config = yaml.safe_load((record.parent / "config.yaml").read_text())
    return list(overrides), config


def trained_with(variants: list[Variant]) -> list[dict]:
    """The distinct environments the sweep's jobs trained with, in job order."""
    found: list[dict] = []
    for env in (r.environment for v in variants for r in v.runs):
        if env and env not in found:
            found.append(env)
    return found


def pretrain_seconds(job: Path, init_from: str | None) -> float:
    """The training seconds of the run whose checkpoint `init_from` names (its `metric_summary.json`,
    beside the checkpoint's folder): a run started from a pretrained model is charged its pretraining,
    so that equal wall time compares whole costs. 0 without init_from."""
    if not init_from:
        return 0.0
    summary = Path(init_from).parent.parent / "metric_summary.json"
    if not summary.is_file():
        raise FileNotFoundError(
            f"{job}: started from init_from={init_from}, whose run folder has no metric_summary.json "
            "to charge its pretraining time from"
        )
    history = json.loads(summary.read_text())["history"]
    return float(history[-1].get("seconds", math.nan)) if history else 0.0


def _job_number(path: Path) -> tuple:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def scored_jobs(sweep: Path, seen: set[Path]) -> list[Path]:
    """The job folders under `sweep` with a `metric_summary.json`, in job order: not the outputs a new run
    set aside (`replaced/`), nor a job already in `seen` (sweeps a and a/0 given together); they join it."""
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep}: no such sweep folder (a Hydra multirun's output folder)")
    found = [p.parent for p in sweep.rglob("metric_summary.json")]
    found = [j for j in found if "replaced" not in j.relative_to(sweep).parts and j.resolve() not in seen]
    seen.update(j.resolve() for j in found)
    return sorted(found, key=_job_number)


def find_runs(sweeps: list[Path]) -> list[Variant]:
    """The finished-or-not jobs under the sweep folders, grouped into variants in sweep order."""
    runs: list[Run] = []
    overrides: list[list[str]] = []
    metrics: dict[str, Path] = {}  # each metric key the jobs report, with the first job reporting it
    measured: dict[str, Path] = {}  # each way the jobs measured it (samples, subsets, reference, features)
    seen: set[Path] = set()
    for sweep in sweeps:
        for job in scored_jobs(sweep, seen):
            run, job_overrides, summary = read_job(job)
            runs.append(run)
            overrides.append(job_overrides)
            metrics.setdefault(summary.get("metric", "metric"), job)
            measured.setdefault(json.dumps(measured_by(summary), sort_keys=True), job)
    if len(metrics) > 1:  # one column, one axis: values of different metrics do not compare
        listed = ", ".join(f"{metric} ({job})" for metric, job in metrics.items())
        raise ValueError(f"the jobs report different metrics: {listed}; report one metric at a time")
    if len(measured) > 1:  # an FD of 99 samples beside one of 297: another ruler, not a better run
        listed = "; ".join(
            f"{', '.join(f'{k}={v}' for k, v in json.loads(m).items())} ({job})"
            for m, job in measured.items()
        )
        raise ValueError(f"the jobs measured their metric differently: {listed}; report jobs measured alike")
    variants: dict[str, Variant] = {}
    for run, label in zip(runs, variant_labels(overrides)):
        variants.setdefault(label, Variant(label)).runs.append(run)
    if not variants:
        jobs = job_folders(sweeps)
        said = (
            f": its {len(jobs)} job folder(s) ({', '.join(str(j) for j in jobs[:3])}"
            + (", ..." if len(jobs) > 3 else "")
            + ") were refused or stopped before their first evaluation (each says why in "
            ".hydra/launches/*/train.log), or ran with eval=null"
            if jobs
            else ": were the jobs run with an evaluation (eval is not null)?"
        )
        raise FileNotFoundError(f"no metric_summary.json under {', '.join(map(str, sweeps))}{said}")
    unscored = [j for j in job_folders(sweeps) if j.resolve() not in seen]
    if unscored:
        note(
            f"{len(unscored)} job folder(s) have no metric_summary.json and are not in the report: refused, "
            "or stopped before their first evaluation (each says why in .hydra/launches/*/train.log): "
            + ", ".join(map(str, unscored[:5]))
            + (", ..." if len(unscored) > 5 else "")
        )
    return list(variants.values())


def read_job(job: Path) -> tuple[Run, list[str], dict]:
    """A job folder's run (its metric's history, seed and length), its launch's overrides and its
    metric_summary.json."""
    checkpoint = job_checkpoint(job)
    job_overrides, config = job_record(job, checkpoint)
    summary = json.loads((job / "metric_summary.json").read_text())
    history = summary["history"]
    offset = pretrain_seconds(job, config.get("init_from"))
    run = Run(
        path=job,
        seed=int(config.get("seed", 0)),
        iterations=[int(h["iteration"]) for h in history],
        values=[float(h["value"]) for h in history],
        seconds=[offset + float(h.get("seconds", math.nan)) for h in history],
        references=summary.get("references", {}),
        pretrain_seconds=offset,
        # what its latest launch trained with (None: no checkpoint, or one from before it was kept)
        environment=latest_environment((checkpoint or {}).get("act_history")),
        planned=int(config["iterations"]) if isinstance(config.get("iterations"), int) else None,
    )
    return run, job_overrides, summary


MEASURED = ("features", "num_samples", "subset_size", "reference")  # what a metric's values depend on


def measured_by(summary: dict) -> dict:
    """How a job measured its metric (metric_summary.json's keys; a summary from before them: none)."""
    return {key: summary[key] for key in MEASURED if key in summary}


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def job_folders(sweeps: list[Path]) -> list[Path]:
    """Every job folder a launch wrote into under the sweeps (its `.hydra/launches`), but for the outputs a
    new run set aside (`replaced/`)."""
    found = {p.parent.parent for sweep in sweeps for p in sweep.glob("**/.hydra/launches")}
    return sorted(j for j in found if "replaced" not in j.parts)


def say_what_is_compared(variants: list[Variant]) -> None:
    """Notes on runs the table's columns do not compare as equals: runs not at their end (left out of the
    value at the end), a seed given twice in one variant (not an independent repeat), and a variant whose
    runs end at different iterations (its value at the end mixes them)."""
    for v in variants:
        for r in v.runs:
            if not r.finished:
                last = r.iterations[-1] if r.iterations else 0
                note(
                    f"{r.path} is at iteration {last} of {r.planned} (still training, or stopped): left "
                    f"out of the value at the end of `{v.label}`"
                )
        seeds = [r.seed for r in v.runs]
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            note(
                f"`{v.label}` holds seed(s) {', '.join(map(str, twice))} more than once: not independent "
                "repeats"
            )
        ends = sorted({r.iterations[-1] for r in v.runs if r.finished and r.iterations})
        if len(ends) > 1:
            note(
                f"`{v.label}`'s runs end at different iterations ({', '.join(map(str, ends))}): its value "
                "at the end mixes them; --at-iteration compares them at one"
            )


def value_at_iteration(run: Run, iteration: int) -> float | None:
    return next((v for k, v in zip(run.iterations, run.values) if k == iteration), None)


def value_at_seconds(run: Run, seconds: float, tolerance: float = 0.03) -> tuple[float | None, bool]:
    """The metric at `seconds` of training, linear between evaluations; (value, whether the run had
    ended more than `tolerance` (relative) before `seconds`: the value is then its last)."""
    t = np.asarray(run.seconds)
    if not len(t) or np.isnan(t).any() or seconds < t[0]:
        return None, False
    if seconds > t[-1]:
        return run.values[-1], seconds > t[-1] * (1 + tolerance)
    return float(np.interp(seconds, t, run.values)), False


def _mean_spread(xs: list[float | None]) -> dict:
    """Mean, sample standard deviation and range of the values that are there (None: missing); a NaN among
    them (a metric that diverged) makes every statistic NaN."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    if any(math.isnan(x) for x in xs):
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": len(xs)}
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def _recorded(seconds: float) -> float | None:
    """Training seconds as the table takes them: NaN (a history written without them) is missing."""
    return None if math.isnan(seconds) else seconds


def summarise(
    variants: list[Variant], at_iteration: int | None, at_seconds: float | None, time_ref: str | None
):
    """The table's rows and the comparison points (K iterations, T seconds)."""
    runs = [r for v in variants for r in v.runs]
    # the finished runs decide the default: one run stopped early (diverged, killed) pulled the column back
    # to its last evaluation, iteration 0 for a run that diverged before its first
    common = set.intersection(*(set(r.iterations) for r in ([r for r in runs if r.finished] or runs)))
    if at_iteration is None:  # the last iteration every finished run was evaluated at
        at_iteration = max(common) if common else None
        short = [str(r.path) for r in runs if at_iteration is not None and at_iteration not in r.iterations]
        if short:
            note(
                f"{', '.join(short)} {'was' if len(short) == 1 else 'were'} not evaluated at iteration "
                f"{at_iteration} (stopped before it): left out of the column at {at_iteration} iterations"
            )
    elif at_iteration not in common:  # a job not evaluated there is left out of its variant's cell
        some = any(at_iteration in r.iterations for v in variants for r in v.runs)
        said = (
            "a cell averages the jobs of its variant that were (the JSON's n counts them; none: empty)"
            if some
            else "the column's cells are empty"
        )
        note(
            f"--at-iteration {at_iteration}: {'not every' if some else 'no'} job was evaluated there "
            f"(all were at {', '.join(map(str, sorted(common))) or 'no common iteration'}): {said}"
        )
    reference = variants[0]
    if time_ref is not None:
        matches = [v for v in variants if v.label == time_ref]
        if matches:
            reference = matches[0]
        else:  # e.g. make reproduce-mini run with fewer variants: say so and go on
            note(
                f"--time-reference {time_ref!r} is not among the variants "
                f"({', '.join(v.label for v in variants)}): equal wall time is that of {reference.label!r}"
            )
    if at_seconds is None:
        ends = [r.seconds[-1] for r in reference.runs if r.seconds and not math.isnan(r.seconds[-1])]
        at_seconds = statistics.fmean(ends) if ends else None
    rows = []
    for v in variants:
        at_t = [value_at_seconds(r, at_seconds) if at_seconds is not None else (None, False) for r in v.runs]
        rows.append(
            {
                "variant": v.label,
                "seeds": sorted(r.seed for r in v.runs),
                "iterations": max(r.iterations[-1] for r in v.runs),
                "train_seconds": _mean_spread([_recorded(r.seconds[-1]) for r in v.runs]),
                "pretrain_seconds": _mean_spread([_recorded(r.pretrain_seconds) for r in v.runs]),
                "final": _mean_spread([r.values[-1] for r in v.runs if r.finished]),
                "at_iteration": _mean_spread(
                    [value_at_iteration(r, at_iteration) for r in v.runs] if at_iteration is not None else []
                ),
                "at_seconds": _mean_spread([x for x, _ in at_t]),
                "ended_before_seconds": any(ended for _, ended in at_t),
            }
        )
    return rows, at_iteration, at_seconds, reference.label


def _band(runs: list[Run], xs_of) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean x, and mean / min / max of the metric over seeds, at the iterations all seeds were evaluated
    at (matched by iteration: a seed resumed at another eval.every has other evaluations between)."""
    shared = sorted(set.intersection(*(set(r.iterations) for r in runs)))
    at = [[r.iterations.index(k) for k in shared] for r in runs]
    x = np.mean([np.asarray(xs_of(r), dtype=float)[i] for r, i in zip(runs, at)], axis=0)
    y = np.array([np.asarray(r.values, dtype=float)[i] for r, i in zip(runs, at)])
    return x, y.mean(axis=0), y.min(axis=0), y.max(axis=0)


def plot(variants: list[Variant], path: Path, metric: str, at_iteration, at_seconds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    for i, v in enumerate(variants):
        colour = f"C{i}"
        label = f"{v.label} ({len(v.runs)} seed{'s' if len(v.runs) > 1 else ''})"
        for ax, xs_of in ((axes[0], lambda r: r.iterations), (axes[1], lambda r: r.seconds)):
            x, mean, lo, hi = _band(v.runs, xs_of)
            ax.plot(x, mean, color=colour, marker="o", ms=3, label=label)
            if len(v.runs) > 1:
                ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)
    real = [r.references["real"] for v in variants for r in v.runs if "real" in r.references]
    drawn = [y for v in variants for r in v.runs for y in r.values if not math.isnan(y)] + real
    for ax in axes:
        if real:
            ax.axhline(statistics.fmean(real), ls="--", color="gray", lw=1, label="held-out real images")
        if all(y > 0 for y in drawn):  # a log axis drops values <= 0 (an FD near 0 can round below it)
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    if at_iteration is not None:
        axes[0].axvline(at_iteration, color="black", lw=0.8, ls=":")
    if at_seconds is not None:
        axes[1].axvline(at_seconds, color="black", lw=0.8, ls=":")
    axes[0].set_xlabel("ACT iteration")
    axes[1].set_xlabel("training seconds (evaluations excluded)")
    axes[0].set_ylabel(metric)
    fig.suptitle(
        "mean over seeds; band: min to max over seeds; dotted: the table's comparison points", fontsize=9
    )
    handles, labels = axes[0].get_legend_handles_labels()
    if max(map(len, labels)) <= 40:
        axes[0].legend(fontsize=8)
        fig.tight_layout()
    else:  # labels of several overrides would hide the curves: a legend under both plots
        legend = 0.18 * len(labels) + 0.1  # inches
        fig.set_figheight(4.2 + legend)
        fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, legend / (4.2 + legend), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _fmt(stats: dict, digits: int = 1) -> str:
    if stats["mean"] is None:
        return "-"
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown(
    rows, at_iteration, at_seconds, time_ref: str, metric: str, machine: str, environments: list[dict] = ()
) -> str:
    equal_time = f"at {at_seconds:.0f} s" if at_seconds is not None else "at equal time"
    head = (
        f"| variant | seeds | iterations | training s | {metric} at the end (mean ± sd) | min - max "
        f"| at {at_iteration} iterations | {equal_time} |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        mark = " (ended earlier: its last value)" if r["ended_before_seconds"] else ""
        f = r["final"]
        spread = "-" if f["min"] is None else f"{f['min']:.1f} - {f['max']:.1f}"  # no run at its end yet
        lines.append(
            f"| {r['variant']} | {len(r['seeds'])} | {r['iterations']} | {_fmt(r['train_seconds'], 0)} "
            f"| {_fmt(f)} | {spread} | {_fmt(r['at_iteration'])} "
            f"| {_fmt(r['at_seconds'])}{mark} |"
        )
    lines.append("")
    if at_seconds is not None:
        lines.append(
            f"Equal wall time: {at_seconds:.0f} training seconds, the mean of `{time_ref}`'s runs; values "
            "between evaluations are interpolated linearly."
        )
    charged = [r for r in rows if r["pretrain_seconds"]["mean"]]
    if charged:
        lines.append(
            "Training seconds include the pretraining of the runs that started from one (init_from): "
            + ", ".join(f"`{r['variant']}` {_fmt(r['pretrain_seconds'], 0)} s" for r in charged)
            + "; their curves start there."
        )
    lines.append(f"Machine: {machine}.")
    if len(environments) == 1:
        lines.append(f"Trained with: {describe(environments[0])}.")
    elif environments:  # jobs of one sweep that ran different code or packages: say so, each
        lines.append("Trained with (the jobs differ): " + "; ".join(map(describe, environments)) + ".")
    return "\n".join(lines) + "\n"


def machine_description() -> str:
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def output_paths(out: Path) -> dict[str, Path]:
    """OUT.png, OUT.md and OUT.json (OUT's own .png, .md or .json is taken off first; any other dot in the
    name stays: `--out gan_ratio_0.3` writes gan_ratio_0.3.png), their folder made."""
    if out.suffix in (".png", ".md", ".json"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    return {suffix: out.with_name(out.name + suffix) for suffix in (".png", ".md", ".json")}


def check_points(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The equal-iterations and equal-time points, when given, are ones a run can reach."""
    if args.at_iteration is not None and args.at_iteration < 0:
        parser.error(f"--at-iteration {args.at_iteration}: an ACT iteration, 0 or more")
    if args.at_seconds is not None and not args.at_seconds > 0:  # an empty column otherwise
        parser.error(f"--at-seconds {args.at_seconds}: training seconds, more than 0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m act_lightning.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweeps", nargs="+", type=Path, help="multirun folders (their jobs' run folders)")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.png, OUT.md and OUT.json")
    parser.add_argument(
        "--at-iteration", type=int, default=None, help="equal iterations (default: the last all share)"
    )
    parser.add_argument("--at-seconds", type=float, default=None, help="equal wall time in training seconds")
    parser.add_argument(
        "--time-reference",
        default=None,
        help="variant whose mean training time is the equal time (default: the first)",
    )
    parser.add_argument("--metric", default=None, help="axis label (default: the summaries' metric key)")
    args = parser.parse_args(argv)
    check_points(args, parser)
    try:
        variants = find_runs(args.sweeps)
        say_what_is_compared(variants)
        rows, at_iteration, at_seconds, time_ref = summarise(
            variants, args.at_iteration, args.at_seconds, args.time_reference
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    first = variants[0].runs[0].path / "metric_summary.json"
    metric = args.metric or json.loads(first.read_text()).get("metric", "metric")
    machine = machine_description()
    out = output_paths(args.out)
    plot(variants, out[".png"], metric, at_iteration, at_seconds)
    environments = trained_with(variants)
    table = markdown(rows, at_iteration, at_seconds, time_ref, metric, machine, environments)
    out[".md"].write_text(table)
    curves = {
        v.label: [
            {"seed": r.seed, "iteration": r.iterations, "value": r.values, "seconds": r.seconds}
            for r in v.runs
        ]
        for v in variants
    }
    report = {
        "metric": metric,
        "measured": measured_by(json.loads(first.read_text())),  # alike for every job (find_runs)
        "machine": machine,
        "trained_with": environments,
        "at_iteration": at_iteration,
        "at_seconds": at_seconds,
        "time_reference": time_ref,
        "rows": rows,
        "curves": curves,
    }
    out[".json"].write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"wrote {out['.png']}, .md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
