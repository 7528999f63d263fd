"""report.md: the runs at a glance, the ranking in the form of the paper's Table I, where the
measurements agree with the paper, the figures, and every setting's figures over its seeds."""

from __future__ import annotations

from pathlib import Path

from .claims import PAPER_RANK, ROWS, check_claims, ranking
from .compare import Design, Entry, pct
from .load import Run, Setting, by_group
from .names import FRAMEWORKS, TASKS, TITLES, fmt
from .stats import t_interval

CURVE_COLUMNS = 11  # rounds shown in the curve table: evenly spaced, the last always among them

Table = dict[str, dict[str, tuple[float, int]]]  # what claims.ranking returns


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _unfinished(runs: list[Run]) -> str:
    unfinished = [r for r in runs if r.summary is None]
    if not unfinished:
        return ""
    return f" ({len(unfinished)} unfinished, {sum(r.failed for r in unfinished)} of them failed: listed at the end)"


def _head(root: Path, runs: list[Run]) -> list[str]:
    complete = [r for r in runs if r.summary is not None]
    models = sorted({str(r.cfg["model.name"]) for r in complete})
    rounds = sorted({r.cfg["fed.rounds"] for r in complete})
    seeds = sorted({r.cfg["seed"] for r in complete})
    return [
        f"# fedtune sweep report: `{root}`",
        "",
        f"{len(complete)} completed runs{_unfinished(runs)} · model {', '.join(models)} · rounds {', '.join(map(str, rounds))} "
        f"· seeds {', '.join(map(str, seeds))}. Every figure is a mean over seeds (± sample standard deviation); "
        "traffic is the serialized bytes each client sent plus received per round, compute is the client's "
        "analytic FLOPs per round.",
        "",
    ]


def _ranking(table: Table, settings: list[Setting]) -> list[str]:
    out = [
        "## Ranking in the form of the paper's Table I",
        "",
        "Each cell: the framework's figure (its mean over the swept settings) and its rank among the measured "
        "frameworks, rank 1 = best (highest accuracy, least traffic, least client compute); in brackets the rank "
        "the paper's Table I gives (-: a framework the paper did not compare).",
        "",
    ]
    # The paper's three frameworks always, any other registered one where it was measured.
    measured = {s.framework for s in settings}
    columns = [fw for fw in FRAMEWORKS if fw in PAPER_RANK["accuracy"] or fw in measured]
    rows = []
    for key, title, task, metric, _ in ROWS:
        cells = []
        for fw in columns:
            paper = PAPER_RANK[key].get(fw, "-")  # "-": a framework the paper did not compare
            if fw in table[key]:
                x, rank = table[key][fw]
                cells.append(f"{fmt(metric, x)} · **{rank}** ({paper})")
            else:
                cells.append(f"not measured ({paper})")
        rows.append([title] + cells)
    return out + [_md_table(["metric"] + [TITLES[fw] for fw in columns], rows), ""]


def _agreement(table: Table) -> list[str]:
    out = ["## Where the measurements agree with the paper", ""]
    for text, verdict, detail in check_claims(table):
        out.append(f"- **{verdict}**: {text} (measured: {detail}).")
    for key, title, *_ in ROWS:
        measured = sorted(table[key], key=lambda fw: table[key][fw][1])
        paper = [fw for fw in sorted(PAPER_RANK[key], key=PAPER_RANK[key].get) if fw in table[key]]
        if len(measured) >= 2:
            # Frameworks the paper did not compare are listed but do not count against its order.
            same = "the same as" if [fw for fw in measured if fw in PAPER_RANK[key]] == paper else "unlike"
            out.append(f"- {title}, best first: measured {', '.join(measured)}; {same} the paper's {', '.join(paper)}.")
    return out + [""]


def _per_setting(settings: list[Setting]) -> list[str]:
    out = ["## Results per setting", ""]
    header = ["setting", "seeds", "final acc", "best acc", "MB up", "MB down", "MB/client/round",
              "GFLOPs/client/round", "client s/round", "wall s"]
    metrics = ["final_acc", "best_acc", "mb_up", "mb_down", "mb", "gflops", "client_s", "wall_s"]
    groups = by_group(settings)
    for fw in FRAMEWORKS + tuple(sorted({s.framework for s in settings} - set(FRAMEWORKS))):
        for task in TASKS:
            group = groups.get((fw, task))
            if not group:
                continue
            out += [f"### {TITLES.get(fw, fw)}, {TASKS[task]}", ""]
            rows = [[s.label, str(len(s.runs))] + [fmt(m, *s.stats[m]) if m in s.stats else "-" for m in metrics]
                    for s in group]
            out += [_md_table(header, rows), ""]
    return out


def _curves(found: list[Entry]) -> list[str]:
    """Each entry's test figure at the evaluated rounds: mean and 95% half-width over its seeds."""
    def figure(run: Run, rnd: int) -> float | None:
        return next((r["test_accuracy"] for r in run.rounds if r["round"] == rnd and r.get("test_accuracy") is not None), None)

    rounds = sorted({r["round"] for e in found for run in e.runs.values() for r in run.rounds
                     if r.get("test_accuracy") is not None})
    if len(rounds) < 2:
        return []
    step = -(-len(rounds) // CURVE_COLUMNS)
    shown = rounds[::-1][::step][::-1]
    rows = []
    for e in found:
        cells = []
        for rnd in shown:
            iv = t_interval([v for v in (figure(run, rnd) for run in e.runs.values()) if v is not None])
            cells.append("-" if not iv.n else pct(iv.mean) + ("" if iv.n < 2 else f" ± {pct(iv.half)}"))
        rows.append([e.name] + cells)
    return ["### Test figure per round", "",
            "Mean over seeds ± the 95% interval's half-width, at the rounds the curve was measured (under "
            "`eval.curve_size` a fixed subset of the test rows, the last round the full test set).", "",
            _md_table(["entry"] + [f"round {r}" for r in shown], rows), ""]


def comparison(found: list[Entry], base: str, design: Design) -> list[str]:
    """Mean and 95% interval per entry; paired differences against the baseline, worded by
    whether their interval excludes zero (report/stats.py)."""
    if not any(e.interval.n >= 2 for e in found) and not design.select:
        return []
    chosen = design.select == "val"
    out = ["## Statistics over seeds", "",
           "Each entry's final test figure (the task's metric, in %, on the full test set): mean over seeds and its "
           "95% confidence interval (Student's t over the seeds; one seed has no interval)."
           + (f" Each method's hyperparameters were chosen on the validation rows (`select = \"val\"`, "
              f"`select_round = \"{design.select_round}\"`"
              + (f", on seed(s) {', '.join(map(str, design.select_seeds))}; the other seeds ran the chosen point only"
                 if design.select_seeds else "")
              + "): the chosen point is named, and test figures played no part in the choice." if chosen else ""), ""]
    header = ["entry", "seeds", "mean", "95% CI"] + (["chosen on validation"] if chosen else [])
    rows = [[e.name, str(e.interval.n), pct(e.interval.mean), f"{pct(e.interval.low)} to {pct(e.interval.high)}"]
            + ([e.note] if chosen else []) for e in found]
    out += [_md_table(header, rows), ""] + _curves(found)
    if not base:
        return out + ["No baseline named (`baseline = \"NAME\"` in [sweep] or `fedtune report --baseline NAME`): "
                      "no paired differences.", ""]
    out += [f"## Paired differences against `{base}`", "",
            f"Per seed: entry minus `{base}` on the same seed (points of %), then mean and 95% interval over the "
            "seeds both have. An entry wins (loses) only when the whole interval lies above (below) zero; otherwise "
            "the seeds show no significant difference.", ""]
    others = [e for e in found if e.diff is not None]
    rows = [[e.name, str(e.diff.n), pct(e.diff.mean, True), f"{pct(e.diff.low, True)} to {pct(e.diff.high, True)}",
             e.conclusion] for e in others]
    out += [_md_table(["entry", "paired seeds", "mean difference", "95% CI", "conclusion"], rows), ""]
    for e in others:
        words = {"wins": f"beats `{base}`", "loses": f"falls short of `{base}`"}.get(
            e.conclusion, f"shows no significant difference from `{base}`" if e.conclusion.startswith("no") else
            f"cannot be compared with `{base}` ({e.conclusion})")
        out.append(f"- **{e.name}** {words}: {pct(e.diff.mean, True)} points "
                   f"(95% CI {pct(e.diff.low, True)} to {pct(e.diff.high, True)}, {e.diff.n} paired seeds).")
    return out + [""]


def markdown(root: Path, runs: list[Run], settings: list[Setting], figures: list[str],
             compared: list[str] | None = None) -> str:
    table = ranking(settings)
    out = _head(root, runs) + (compared or []) + _ranking(table, settings) + _agreement(table)
    out += ["## Figures", ""]
    out += [f"![{name}]({name})" for name in figures] + [""]
    out += _per_setting(settings)
    unfinished = [r for r in runs if r.summary is None]
    if unfinished:
        out += ["## Unfinished or failed runs (left out above)", ""]
        out += [f"- `{r.path}`" + (" (failed: see error.txt)" if r.failed else "") for r in unfinished] + [""]
    return "\n".join(out)
