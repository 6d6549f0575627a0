"""The evaluation report: one self-contained HTML file.

Images are embedded as base64 PNGs; videos are embedded too while their total size stays under
``evaluate.embed_videos_mb``, and otherwise linked by a path relative to the report (keep the
``videos/`` folder beside it). Sections: what was evaluated, how to read it, the metrics table
(each metric for each curve kind, model beside blind control), the failure-mode table (blind /
success-only / failure-aware, and the episodes flagged as reward hacking), the language table
(per task, final value with the true and with a wrong instruction), the summary figure, then
one card per episode with its figure and video.
"""

from __future__ import annotations

import base64
import html
import os
import time
from typing import Any

from rayrm.evaluate.curves import CURVE_KINDS
from rayrm.evaluate.report import failure_table_rows, json_safe

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; }
table.metrics { border-collapse: collapse; font-size: 13px; }
table.metrics th, table.metrics td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.metrics th { background: #f3f3f3; } table.metrics td.name { text-align: left; }
td.blind { color: #777; background: #fafafa; }
.meta { color: #555; font-size: 13px; } .notes li { margin-bottom: 4px; font-size: 14px; }
.episodes { display: grid; gap: 16px;
  grid-template-columns: repeat(auto-fill, minmax(620px, 1fr)); }
.episode { border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.episode h3 { margin: 2px 0 6px; font-size: 14px; }
.episode img, .episode video, .summary img { max-width: 100%; }
.tag { font-size: 11px; padding: 1px 6px; border-radius: 8px; color: white; margin-left: 6px; }
.success { background: #2a9d4b; } .partial { background: #e0a100; }
.failure { background: #c0392b; } .rewound { background: #5a5a9c; }
"""

NOTES = [
    "<b>plain prefix</b>: value t is the model's output at the last frame of frames 0..t, "
    "brought to the window length L like a training window: what the model says.",
    "<b>chained</b>: the reference pipeline's stitching of long episodes; chaining alone makes a "
    "blind model score VOC 1.0, so read it only beside the blind column.",
    "<b>causal</b>: the streaming <code>RewardScorer</code> fed one frame at a time (the online "
    "reward); it equals the plain prefix curve to float precision (largest gap shown above).",
    "<b>blind control</b>: the same model trained and scored on all-zero inputs. A metric is "
    "evidence only where the model beats the blind column.",
    "<b>groups</b>: success; partial = failed after reaching more than half of the stages; "
    "failure = failed earlier. Rankings should read success &gt; partial &gt; failure.",
    "<b>language</b>: per task, the mean final value of the plain prefix curve with the "
    "episode's own instruction and with the other tasks' instructions (their mean). A model "
    "that reads the instruction scores successes much lower under a wrong one; the blind "
    "control reads zeros, so its gap is 0.",
    "<b>rewound</b> episodes play an expert forward to a turnaround, then its frames backward: "
    "a model that sees the task follows the true progress down.",
]


def _data_uri(path: str, mime: str) -> str:
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def _html_value(value: Any) -> str:
    value = json_safe(value)
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def metrics_table(model: dict[str, dict], blind: dict[str, dict] | None) -> str:
    names = list(model[CURVE_KINDS[0]])
    head = "".join(
        f"<th>{kind}<br>model</th>" + (f"<th>{kind}<br>blind</th>" if blind else "")
        for kind in CURVE_KINDS
    )
    rows = []
    for name in names:
        cells = []
        for kind in CURVE_KINDS:
            cells.append(f"<td>{_html_value(model[kind].get(name))}</td>")
            if blind:
                cells.append(f"<td class='blind'>{_html_value(blind[kind].get(name))}</td>")
        rows.append(f"<tr><td class='name'>{html.escape(name)}</td>{''.join(cells)}</tr>")
    return f"<table class='metrics'><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def failure_table(columns: dict[str, dict] | None) -> str:
    """Per failure mode, plain prefix curves: the blind control, the success-only model and
    the failure-aware model side by side (``report.failure_table_rows``)."""
    if not columns or "failure-aware" not in columns:
        return "<p class='meta'>not computed</p>"
    head = "".join(f"<th>{html.escape(name)}</th>" for name in columns)
    rows = []
    for label, key in failure_table_rows(columns["failure-aware"]):
        cells = "".join(f"<td>{_html_value(c.get(key))}</td>" for c in columns.values())
        rows.append(f"<tr><td class='name'>{html.escape(label)}</td>{cells}</tr>")
    flagged = columns["failure-aware"].get("hacking_episodes") or []
    listed = html.escape(", ".join(flagged[:50])) or "none"
    return (
        f"<table class='metrics'><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"
        f"<p class='meta'>flagged as reward hacking (progress near 1, success head says "
        f"failure): {listed}</p>"
    )


def instruction_table(instruction: dict | None) -> str:
    """Per task and outcome: episodes, then true / wrong / gap for the model and the blind
    control; only the note when the check could not be made (one task)."""
    if instruction is None:
        return "<p class='meta'>not computed</p>"
    if instruction["model"] is None:
        return f"<p class='meta'>{html.escape(instruction['note'])}</p>"
    blind = {(r["task"], r["outcome"]): r for r in instruction["blind"] or []}
    fields = ("final_true", "final_wrong", "gap")
    head = "".join(f"<th>{f}<br>model</th>" for f in fields)
    head += "".join(f"<th>{f}<br>blind</th>" for f in fields) if blind else ""
    rows = []
    for row in instruction["model"]:
        cells = [f"<td class='name'>{html.escape(row['task'])}</td>"]
        cells += [f"<td class='name'>{row['outcome']}</td><td>{row['num_episodes']}</td>"]
        cells += [f"<td>{_html_value(row[f])}</td>" for f in fields]
        if blind:
            other = blind.get((row["task"], row["outcome"]), {})
            cells += [f"<td class='blind'>{_html_value(other.get(f))}</td>" for f in fields]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = html.escape(f"wrong instruction: {instruction['wrong_instruction']}")
    return (
        f"<p class='meta'>{note}</p><table class='metrics'><tr><th>task</th><th>episodes</th>"
        f"<th>n</th>{head}</tr>{''.join(rows)}</table>"
    )


def _video_tag(path: str | None, report_dir: str, embed: bool) -> str:
    if not path:
        return ""
    src = _data_uri(path, "video/mp4") if embed else os.path.relpath(path, report_dir)
    return f"<video controls loop muted preload='metadata' src='{html.escape(src)}'></video>"


def episode_cards(cards: list[dict], report_dir: str, embed_videos: bool) -> str:
    out = []
    for card in cards:
        tag = f"<span class='tag {card['group']}'>{html.escape(card['group'])}</span>"
        image = f"<img alt='curve' src='{_data_uri(card['png'], 'image/png')}'>"
        video = _video_tag(card.get("video"), report_dir, embed_videos)
        out.append(
            f"<div class='episode' id='{html.escape(card['episode_id'])}'>"
            f"<h3>{html.escape(card['episode_id'])}{tag}</h3>{image}{video}</div>"
        )
    return f"<div class='episodes'>{''.join(out)}</div>"


def write_report(
    path: str,
    title: str,
    facts: dict[str, Any],
    model_metrics: dict,
    blind_metrics: dict | None,
    summary_png: str,
    cards: list[dict],
    embed_videos_mb: float,
    instruction: dict | None = None,
    failure_columns: dict[str, dict] | None = None,
) -> str:
    """Write the report; returns its path. ``facts`` are shown as a list at the top;
    ``instruction`` is ``metrics.json["instruction"]``; ``failure_columns`` the prefix
    metrics of each model for the failure-mode table (name -> metrics)."""
    report_dir = os.path.dirname(os.path.abspath(path))
    video_bytes = sum(os.path.getsize(c["video"]) for c in cards if c.get("video"))
    embed = video_bytes <= embed_videos_mb * 1e6
    facts_html = "".join(
        f"<li><b>{html.escape(k)}</b>: {_html_value(v)}</li>" for k, v in facts.items()
    )
    notes = "".join(f"<li>{n}</li>" for n in NOTES)
    summary = _data_uri(summary_png, "image/png")
    body = f"""
<h1>{html.escape(title)}</h1>
<ul class='meta'>{facts_html}<li><b>written</b>: {time.strftime("%Y-%m-%d %H:%M:%S")}</li></ul>
<h2>How to read this</h2><ul class='notes'>{notes}</ul>
<h2>Metrics</h2>{metrics_table(model_metrics, blind_metrics)}
<h2>Failure modes: blind / success-only / failure-aware</h2>{failure_table(failure_columns)}
<h2>Language: true vs wrong instruction</h2>{instruction_table(instruction)}
<h2>Summary</h2><div class='summary'><img alt='summary' src='{summary}'></div>
<h2>Episodes</h2>
<p class='meta'>Videos {"embedded" if embed else "linked from videos/ beside this file"}.</p>
{episode_cards(cards, report_dir, embed)}
"""
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )
    os.makedirs(report_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(page)
    return path
