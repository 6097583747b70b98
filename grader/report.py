"""The score report written after every batch: how the class did, question by question, which
submissions were slowest, and every one that failed or crashed with its reason.

``write_report`` reads the batch's table (otter's ``final_grades.csv`` layout: a
``points-per-question`` row, one row per submission, ``grading_status``) and the seconds each
submission took, and writes ``report.html`` (self-contained: the figures are embedded) and the
figures as PNG files beside it, ``report-totals.png`` and ``report-questions.png``.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

POSSIBLE = "points-per-question"


def questions_of(table: Any) -> list[str]:
    """The question columns: every column but the ones otter's table adds around them."""
    from .otter_adapter import score_columns
    meta = score_columns()
    return [c for c in table.columns if c not in meta]


def split_table(table: Any) -> tuple[Any, Any]:
    """(points possible per question, one row per submission indexed by file)."""
    indexed = table.set_index("file")
    possible = indexed.loc[POSSIBLE, questions_of(table)].astype(float)
    return possible, indexed.drop(index=POSSIBLE)


def question_summary(table: Any) -> Any:
    """Per question: points possible, mean score, and the share of submissions with full,
    partial and no marks (a pandas DataFrame indexed by question)."""
    import pandas as pd
    possible, rows = split_table(table)
    out = []
    for q in questions_of(table):
        scores = rows[q].astype(float)
        full = (scores >= possible[q] - 1e-9) if possible[q] > 0 else scores == scores
        none = scores <= 1e-9
        n = max(len(scores), 1)
        out.append(dict(question=q, possible=possible[q], mean=scores.mean(),
                        full=full.sum() / n, partial=(~full & ~none).sum() / n,
                        none=(none & ~full).sum() / n))
    return pd.DataFrame(out).set_index("question")


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _figures(table: Any) -> dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    possible, rows = split_table(table)
    total = float(possible.sum())
    figures = {}

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    earned = rows["total_points_earned"].astype(float)
    bins = min(25, max(5, int(total) + 1))
    ax.hist(earned, bins=bins, range=(0, max(total, 1)), color="#4c72b0", edgecolor="white")
    ax.axvline(earned.mean(), color="#c44e52", linestyle="--",
               label=f"mean {earned.mean():.1f} of {total:g}")
    ax.set_xlabel("total points")
    ax.set_ylabel("submissions")
    ax.set_title(f"Total score, {len(rows)} submissions")
    ax.legend(frameon=False)
    figures["totals"] = _png(fig)
    plt.close(fig)

    summary = question_summary(table)
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(summary) + 1.2))
    left = [0.0] * len(summary)
    for column, label, colour in (("full", "full marks", "#55a868"),
                                  ("partial", "partial marks", "#dd8452"),
                                  ("none", "no marks", "#c44e52")):
        shares = (summary[column] * 100).tolist()
        ax.barh(summary.index, shares, left=left, color=colour, label=label)
        left = [a + b for a, b in zip(left, shares)]
    for y, (_, row) in enumerate(summary.iterrows()):
        ax.text(101, y, f"mean {row['mean']:.1f}/{row['possible']:g}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 125)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("% of submissions")
    ax.set_title("Per question: full, partial and no marks")
    ax.legend(frameon=False, ncol=3, loc="upper center", bbox_to_anchor=(0.45, -0.12 -
              0.6 / (len(summary) + 2)))
    figures["questions"] = _png(fig)
    plt.close(fig)
    return figures


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def problems(table: Any) -> list[tuple[str, str]]:
    """(file, reason) for each submission whose grading did not complete, in table order."""
    _, rows = split_table(table)
    status = rows["grading_status"].astype(str)
    return [(name, reason) for name, reason in status.items() if reason != "Completed"]


def write_report(table: Any, seconds: dict[str, float], out_dir: Path, *, title: str = "",
                 slowest: int = 10) -> Path:
    """Write ``report.html`` and its figures into ``out_dir``; ``seconds`` maps a submission's
    file name to the time its grading took. Returns the HTML's path."""
    from .grade import write_atomically

    possible, rows = split_table(table)
    figures = _figures(table)
    for name, data in figures.items():
        write_atomically(out_dir / f"report-{name}.png", data)
    summary = question_summary(table)
    earned = rows["total_points_earned"].astype(float)
    slow = sorted(seconds.items(), key=lambda item: -item[1])[:slowest]
    status = rows["grading_status"].astype(str)
    trouble = problems(table)

    def image(name: str, alt: str) -> str:
        data = base64.b64encode(figures[name]).decode()
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title or 'Grading report')}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:.25em .6em;text-align:left}th{background:#f3f3f3}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>{html.escape(title or 'Grading report')}</h1>",
        f"<p>{len(rows)} submissions; total possible {possible.sum():g} points; mean "
        f"{earned.mean():.2f}, median {earned.median():.2f}; {len(trouble)} did not complete "
        "grading.</p>",
        "<h2>Totals</h2>", image("totals", "histogram of total scores"),
        "<h2>Questions</h2>", image("questions", "share of full, partial and no marks"),
        _html_table(["question", "possible", "mean", "full marks", "partial", "no marks"],
                    [[q, f"{r['possible']:g}", f"{r['mean']:.2f}", f"{r['full']:.0%}",
                      f"{r['partial']:.0%}", f"{r['none']:.0%}"]
                     for q, r in summary.iterrows()]),
        f"<h2>Slowest {len(slow)}</h2>",
        _html_table(["submission", "seconds", "status"],
                    [[name, f"{s:.1f}", status.get(name, "")] for name, s in slow]),
        "<h2>Failed or crashed</h2>",
        (_html_table(["submission", "points", "reason"],
                     [[name, f"{earned[name]:g}", reason] for name, reason in trouble])
         if trouble else "<p>None: every submission was graded to the end.</p>"),
        "</body></html>\n",
    ]
    path = out_dir / "report.html"
    write_atomically(path, "\n".join(parts).encode())
    return path
