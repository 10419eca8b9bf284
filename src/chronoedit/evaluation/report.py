"""A run's files for people and programs: ``scores.csv`` (one row per item, the judge model and rubric beside every
score), ``summary.json`` and ``report.html`` (offline: the summary table, per-category bar charts drawn with
matplotlib as PNG files, and a gallery of input | output | scores | the judge's reasoning, filterable by category and
score). The report's images sit in ``report_files/`` beside it; nothing is loaded from another host.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .. import files

if TYPE_CHECKING:
    from .run import ItemResult

REPORT_FILES = "report_files"
THUMB = 256
BASE_COLUMNS = ["id", "category", "language", "status", "score"]
TAIL_COLUMNS = ["clip_similarity", "changed_fraction", "psnr", "ssim", "judge_model", "rubric", "error", "reasoning",
                "instruction", "input", "output"]  # fmt: skip


def write_run_files(out_dir: Path, summary: dict[str, Any], results: list[ItemResult]) -> None:
    """``scores.csv``, ``summary.json``, the charts and ``report.html`` (each written atomically)."""
    axes = list(dict.fromkeys(axis for r in results if r.verdict and r.verdict.score for axis in r.verdict.score.axes))
    rows = [_row(result, axes, summary) for result in results]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*BASE_COLUMNS, *axes, *TAIL_COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with files.writing(out_dir / "scores.csv"):
        files.save_text(buffer.getvalue(), out_dir / "scores.csv")
        files.write_json(out_dir / "summary.json", summary)
        charts = write_charts(out_dir / REPORT_FILES, summary)
        gallery = _gallery(out_dir, results, axes)
        files.save_text(render_html(summary, charts, gallery), out_dir / "report.html")


def _row(result: ItemResult, axes: list[str], summary: dict[str, Any]) -> dict[str, Any]:
    score = result.verdict.score if result.verdict and result.verdict.score else None
    row: dict[str, Any] = {"id": result.item.id, "category": result.item.category, "language": result.item.language,
                           "status": result.status, "score": _num(score.score) if score else "",
                           "judge_model": summary.get("judge_model") or "", "rubric": summary.get("rubric") or "",
                           "error": result.error, "reasoning": score.reasoning if score else "",
                           "instruction": result.item.instruction, "input": str(result.item.image),
                           "output": str(result.output or "")}  # fmt: skip
    for axis in axes:
        row[axis] = _num(score.axes.get(axis)) if score else ""
    for name in ("clip_similarity", "changed_fraction", "psnr", "ssim"):
        row[name] = _num(result.metrics.get(name))
    return row


def _num(value: float | None) -> str:
    if value is None:
        return ""
    return "inf" if value == math.inf else f"{value:.6g}"


# ------------------------------------------------------------------------------------------------------------ charts
def write_charts(folder: Path, summary: dict[str, Any]) -> list[str]:
    """Bar charts (PNG) of the per-category scores with their 95% intervals and of the per-axis means; their file
    names relative to the report. None without matplotlib (the report says so)."""
    details = summary.get("category_details") or {}
    if not details:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    names = list(details)
    scores = [details[name]["score"] or 0.0 for name in names]
    errors = [[max(0.0, s - (d["ci"] or [s, s])[0]) for s, d in zip(scores, details.values(), strict=True)],
              [max(0.0, (d["ci"] or [s, s])[1] - s) for s, d in zip(scores, details.values(), strict=True)]]
    made = []
    figure, axis = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 2), 3.6), dpi=100)
    axis.bar(names, scores, yerr=errors, capsize=3, color="#4c78a8")
    axis.set_ylabel("score")
    axis.set_title(f"per category ({summary.get('format')}), 95% bootstrap CI", fontsize=10)
    axis.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    figure.savefig(folder / "categories.png")
    plt.close(figure)
    made.append(f"{REPORT_FILES}/categories.png")
    axes = {name: value for name, value in (summary.get("axes") or {}).items() if value is not None}
    if axes:
        figure, axis = plt.subplots(figsize=(max(4.0, 1.1 * len(axes) + 2), 3.2), dpi=100)
        axis.bar(list(axes), list(axes.values()), color="#f58518")
        axis.set_title("per axis")
        axis.tick_params(axis="x", labelrotation=20)
        figure.tight_layout()
        figure.savefig(folder / "axes.png")
        plt.close(figure)
        made.append(f"{REPORT_FILES}/axes.png")
    return made


# ----------------------------------------------------------------------------------------------------------- gallery
def _thumb(source: Path, target: Path) -> str | None:
    try:
        with Image.open(source) as image:
            picture = image.convert("RGB")
            picture.thumbnail((THUMB, THUMB))
            target.parent.mkdir(parents=True, exist_ok=True)
            picture.save(target, format="PNG")
    except OSError:
        return None
    return f"{REPORT_FILES}/{target.name}"


def _gallery(out_dir: Path, results: list[ItemResult], axes: list[str]) -> list[dict[str, Any]]:
    cards = []
    for result in results:
        score = result.verdict.score if result.verdict and result.verdict.score else None
        cards.append({
            "id": result.item.id, "category": result.item.category, "status": result.status,
            "instruction": result.item.instruction, "score": score.score if score else None,
            "axes": {axis: score.axes.get(axis) for axis in axes} if score else {},
            "reasoning": score.reasoning if score else result.error, "metrics": result.metrics,
            "input": _thumb(result.item.image, out_dir / REPORT_FILES / f"{result.item.id}.in.png"),
            "output": _thumb(result.output, out_dir / REPORT_FILES / f"{result.item.id}.out.png")
            if result.output else None,
        })  # fmt: skip
    return cards


# -------------------------------------------------------------------------------------------------------------- html
STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th:first-child,td:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;border-radius:6px;padding:8px;width:540px}
.card img{width:256px;height:auto;background:#eee}figure{margin:0}.pair{display:flex;gap:8px}
.failed{border-color:#d62728}.muted{color:#777}.filters{margin:12px 0;display:flex;gap:16px;align-items:center}"""
SCRIPT = """const cat=document.getElementById('category'),min=document.getElementById('min-score'),
out=document.getElementById('min-score-value'),count=document.getElementById('shown');
function apply(){let n=0;const m=parseFloat(min.value);out.textContent=min.value;
for(const c of document.querySelectorAll('.card')){const s=c.dataset.score===''?NaN:parseFloat(c.dataset.score);
const ok=(cat.value===''||c.dataset.category===cat.value)&&(m<=min.min||s>=m);c.hidden=!ok;if(ok)n++;}
count.textContent=n;}cat.addEventListener('change',apply);min.addEventListener('input',apply);apply();"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "inf" if value == math.inf else f"{value:.{digits}f}"
    return html.escape(str(value))


def _summary_table(summary: dict[str, Any]) -> str:
    ci = summary.get("overall_ci")
    rows = [("overall", summary.get("overall"), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "–",
             summary.get("judged"))]  # fmt: skip
    for name, detail in (summary.get("category_details") or {}).items():
        cat_ci = detail.get("ci")
        rows.append((name, detail.get("score"), f"[{_fmt(cat_ci[0])}, {_fmt(cat_ci[1])}]" if cat_ci else "–",
                     detail.get("n")))  # fmt: skip
    body = "".join(f"<tr><td>{html.escape(str(n))}</td><td>{_fmt(s)}</td><td>{c}</td><td>{_fmt(k)}</td></tr>"
                   for n, s, c, k in rows)  # fmt: skip
    table = f"<table id='summary'><tr><th>category</th><th>score</th><th>95% CI</th><th>n</th></tr>{body}</table>"
    metrics = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v, 4)}</td></tr>"
                      for k, v in (summary.get("metrics") or {}).items())  # fmt: skip
    if metrics:
        table += f"<table id='metrics'><tr><th>metric (mean)</th><th>value</th></tr>{metrics}</table>"
    for language, data in (summary.get("languages") or {}).items():
        table += (f"<p>language <b>{html.escape(language)}</b>: overall {_fmt(data.get('overall'))} "
                  f"(n={data.get('n')})</p>")  # fmt: skip
    return table


def _card(card: dict[str, Any]) -> str:
    score = card["score"]
    axes = ", ".join(f"{html.escape(k)} {_fmt(v, 2)}" for k, v in card["axes"].items())
    metrics = ", ".join(f"{html.escape(k)} {_fmt(v, 3)}" for k, v in card["metrics"].items())
    images = "".join(f"<figure><img src='{html.escape(src)}' alt='{what}'><figcaption>{what}</figcaption></figure>"
                     if src else f"<figure class='muted'>no {what}</figure>"
                     for what, src in (("input", card["input"]), ("output", card["output"])))  # fmt: skip
    failed = "" if card["status"] == "ok" else " failed"
    return (f"<div class='card{failed}' data-category='{html.escape(card['category'])}' "
            f"data-score='{'' if score is None else score}' data-testid='card'>"
            f"<div><b>{html.escape(card['id'])}</b> · {html.escape(card['category'])} · "
            f"<span class='score'>{_fmt(score, 2)}</span> · {html.escape(card['status'])}</div>"
            f"<div class='pair'>{images}</div><div>{html.escape(card['instruction'])}</div>"
            f"<div class='muted'>{axes}</div><div class='muted'>{metrics}</div>"
            f"<div class='reasoning'>{html.escape(card['reasoning'] or '')}</div></div>")  # fmt: skip


def render_html(summary: dict[str, Any], charts: list[str], cards: list[dict[str, Any]]) -> str:
    """The report page (one file; styles and script inline)."""
    categories = sorted({card["category"] for card in cards})
    options = "".join(f"<option>{html.escape(c)}</option>" for c in categories)
    low, high = (0, 10) if summary.get("format") == "gedit" else (1, 5)
    chart_html = "".join(f"<img src='{html.escape(c)}' alt='chart'>" for c in charts) or (
        "<p class='muted'>charts need matplotlib: pip install 'chronoedit[eval]'</p>" if summary.get("categories")
        else "")  # fmt: skip
    title = f"chronoedit eval: {summary.get('label') or Path(str(summary.get('benchmark'))).name}"
    judge = (f"judge {html.escape(str(summary.get('judge_model')))}, rubric {html.escape(str(summary.get('rubric')))}"
             f" ({html.escape(str(summary.get('rubric_digest')))}); {html.escape(str(summary.get('convention')))}"
             if summary.get("judge_model") else "not judged")  # fmt: skip
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>
<p>{html.escape(str(summary.get('format')))} · {summary.get('items')} items · {summary.get('judged')} judged ·
counts {html.escape(json.dumps(summary.get('counts')))}</p><p class="muted">{judge}</p>
{_summary_table(summary)}<div id="charts">{chart_html}</div><h2>Gallery</h2>
<div class="filters"><label>category <select id="category"><option value="">all</option>{options}</select></label>
<label>min score <input id="min-score" type="range" min="{low - 1}" max="{high}" step="0.5" value="{low - 1}">
<span id="min-score-value"></span></label><span><span id="shown"></span> shown</span></div>
<div class="cards">{''.join(_card(card) for card in cards)}</div><script>{SCRIPT}</script></body></html>
"""
