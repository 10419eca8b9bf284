"""Compare two runs item by item (``chronoedit eval compare RUN_A RUN_B``), and tabulate a sweep.

Items judged in both runs are paired by id; the difference is B − A of the item scores. Reported: the mean
difference with a bootstrap 95% interval, wins / losses / ties and the two-sided exact sign-test p, overall and per
category.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import UserError
from .stats import bootstrap_ci, mean, pooled_mean, sign_test


def read_scores(run: Path) -> tuple[dict[str, dict[str, str]], dict[str, Any]]:
    """(judged rows by id, summary) of a run folder; UserError when it is not one."""
    scores, summary = run / "scores.csv", run / "summary.json"
    if not scores.is_file() or not summary.is_file():
        raise UserError(f"{run} is not an eval run folder (no scores.csv and summary.json)", "runs")
    try:
        with open(scores, encoding="utf-8", newline="") as handle:
            rows = {row["id"]: row for row in csv.DictReader(handle) if row.get("status") == "ok" and row.get("score")}
        data = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read the eval run {run}: {exc}", "runs") from None
    return rows, data


def paired(a: dict[str, dict[str, str]], b: dict[str, dict[str, str]], samples: int = 2000) -> dict[str, Any]:
    """Paired statistics of B − A over the ids judged in both, overall and per category."""
    common = sorted(set(a) & set(b))

    def stats(keys: list[str]) -> dict[str, Any]:
        score_a, score_b = [float(a[k]["score"]) for k in keys], [float(b[k]["score"]) for k in keys]
        return _stats([y - x for x, y in zip(score_a, score_b, strict=True)], score_a, score_b, samples)

    result = stats(common)
    by_category: dict[str, list[str]] = defaultdict(list)
    for key in common:
        by_category[a[key]["category"]].append(key)
    result["categories"] = {name: stats(keys) for name, keys in sorted(by_category.items())}
    result["only_a"], result["only_b"] = len(set(a) - set(b)), len(set(b) - set(a))
    return result


def _stats(diffs: list[float], a: list[float], b: list[float], samples: int) -> dict[str, Any]:
    wins, losses, ties, p = sign_test(diffs)
    ci = bootstrap_ci([diffs], pooled_mean, samples)
    return {"n": len(diffs), "mean_a": mean(a), "mean_b": mean(b), "mean_diff": mean(diffs),
            "ci": list(ci) if ci else None, "wins": wins, "losses": losses, "ties": ties, "sign_p": p}  # fmt: skip


def compare_runs(run_a: Path, run_b: Path, samples: int = 2000) -> dict[str, Any]:
    """The comparison of two run folders (same benchmark format, and ideally the same judge and rubric)."""
    a, summary_a = read_scores(run_a)
    b, summary_b = read_scores(run_b)
    if summary_a.get("format") != summary_b.get("format"):
        raise UserError(f"{run_a} ({summary_a.get('format')}) and {run_b} ({summary_b.get('format')}) are different "
                        "benchmarks", "runs")  # fmt: skip
    notes = [f"the {what} differs: {summary_a.get(key)} vs {summary_b.get(key)}"
             for key, what in (("judge_model", "judge model"), ("rubric_digest", "rubric"))
             if summary_a.get(key) != summary_b.get(key)]  # fmt: skip
    result = paired(a, b, samples)
    return {"run_a": str(run_a), "run_b": str(run_b), "format": summary_a.get("format"), "notes": notes} | result


def format_comparison(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`compare_runs`' result."""
    head = f"{'':<24}{'n':>5}{'A':>8}{'B':>8}{'B-A':>8}  {'95% CI':<18}{'W/L/T':>10}{'sign p':>9}"
    lines = [f"A = {result['run_a']}", f"B = {result['run_b']}", *[f"note: {n}" for n in result["notes"]], head]
    for name, stats in [("overall", result), *result["categories"].items()]:
        ci = stats["ci"]
        interval = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "–"
        lines.append(f"{name[:23]:<24}{stats['n']:>5}{_f(stats['mean_a'])}{_f(stats['mean_b'])}"
                     f"{_f(stats['mean_diff'], '+')}  {interval:<18}"
                     f"{stats['wins']}/{stats['losses']}/{stats['ties']:>2}".rjust(10) + f"{stats['sign_p']:>9.3g}")
    if result["only_a"] or result["only_b"]:
        lines.append(f"unpaired: {result['only_a']} judged only in A, {result['only_b']} only in B")
    return "\n".join(lines)


def _f(value: float | None, sign: str = "") -> str:
    return f"{'–':>8}" if value is None else f"{value:>{sign}8.3f}"


def sweep_table(key: str, labels: list[str], summaries: list[dict[str, Any]], runs: list[Path],
                samples: int = 2000) -> list[dict[str, Any]]:  # fmt: skip
    """One row per sweep value: overall with its interval, per category, counts, and the paired comparison with the
    first value."""
    rows = []
    first = read_scores(runs[0])[0] if runs else {}
    for label, summary, run in zip(labels, summaries, runs, strict=True):
        row = {key: label, "overall": summary.get("overall"), "overall_ci": summary.get("overall_ci"),
               "judged": summary.get("judged"), "items": summary.get("items"),
               "categories": summary.get("categories"), "metrics": summary.get("metrics"), "run": str(run)}  # fmt: skip
        if run != runs[0]:
            versus = paired(first, read_scores(run)[0], samples)
            row["vs_first"] = {k: versus[k] for k in ("n", "mean_diff", "ci", "wins", "losses", "ties", "sign_p")}
        rows.append(row)
    return rows


def format_sweep(key: str, rows: list[dict[str, Any]]) -> str:
    """A plain-text sweep table."""
    categories = sorted({name for row in rows for name in (row.get("categories") or {})})
    head = f"{key:<32}{'overall':>9}  {'95% CI':<16}{'judged':>8}" + "".join(f"{c[:12]:>13}" for c in categories)
    head += f"{'vs first':>10}{'sign p':>8}"
    lines = [head]
    for row in rows:
        ci = row.get("overall_ci")
        interval = f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "–"
        cells = "".join(_f((row.get("categories") or {}).get(c)).rjust(13) for c in categories)
        versus = row.get("vs_first")
        tail = f"{versus['mean_diff']:>+10.3f}{versus['sign_p']:>8.3g}" if versus and versus["mean_diff"] is not None \
            else f"{'–':>10}{'–':>8}"  # fmt: skip
        lines.append(f"{str(row[key])[:31]:<32}{_f(row.get('overall')).rjust(9)}  {interval:<16}"
                     f"{row.get('judged')!s:>8}{cells}{tail}")  # fmt: skip
    return "\n".join(lines)
