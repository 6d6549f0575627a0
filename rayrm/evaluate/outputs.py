"""Everything ``rayrm evaluate`` writes in ``evaluate.output`` (listed in
``rayrm.evaluate.run``): metrics JSON/CSV, curves JSON, the summary figure, per-episode
figures and videos, the HTML report. Figures, videos and the page are made by libraries that
write local files: on a URL output they are made in a local folder and uploaded when all are
done."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from rayrm.config import Config, EvaluateConfig
from rayrm.data import storage
from rayrm.evaluate.media import MediaJob, render_all
from rayrm.evaluate.report import (
    causal_gap,
    csv_tables,
    failure_columns,
    instruction_summary,
    outcome_groups,
    write_csv,
    write_json,
)
from rayrm.evaluate.scoring import Scores, StageCounts

CURVE_FILES = (("curves.json", "episode"), ("rewound_curves.json", "rewound"))
SUMMARY_FIGURE = "reward_curves.png"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"


@dataclass(frozen=True)
class Evaluation:
    """What the outputs are made from: the curves and metrics of the model and its controls
    (``controls``: name -> checkpoint, for those that were given)."""

    checkpoint: str
    controls: dict[str, str]
    scores: Scores
    stages: StageCounts
    metrics: dict[str, dict]  # model and each control -> curve kind -> metric -> value
    camera: str  # the camera the videos show
    trained_blind: bool  # the model itself was trained blind (train.blind)


def metrics_summary(ecfg: EvaluateConfig, evaluation: Evaluation) -> dict[str, Any]:
    """``metrics.json``: every metric per curve kind of the model and its controls, the
    instruction table, and the facts of the run."""
    scores, stages, found = evaluation.scores, evaluation.stages, evaluation.metrics
    return {
        "checkpoint": evaluation.checkpoint,
        "blind_checkpoint": evaluation.controls.get("blind"),
        "success_only_checkpoint": evaluation.controls.get("success_only"),
        "input": ecfg.input or ecfg.embeddings,
        "split": ecfg.split,
        "blind": evaluation.trained_blind,
        "num_stages": stages.model_stages,
        "stage_names": stages.names if stages.model_stages else [],
        "causal_max_abs_diff": causal_gap(scores.model),
        "curves": found["model"],
        "blind_control": found.get("blind"),
        "success_only_control": found.get("success_only"),
        "instruction": instruction_summary(scores.model, scores.blind),
    }


def write_outputs(cfg: Config, evaluation: Evaluation, summary: dict, title: str) -> bool:
    """Write every output in ``evaluate.output`` (``summary``: :func:`metrics_summary`);
    whether a report was written."""
    ecfg = cfg.evaluate
    rows = evaluation.scores.model
    with storage.staged_output(ecfg.output) as out:
        write_json(os.path.join(out, METRICS_FILE), summary)
        tables = csv_tables(evaluation.metrics, summary["instruction"])
        write_csv(os.path.join(out, "metrics.csv"), tables)
        for name, kind in CURVE_FILES:
            write_json(os.path.join(out, name), rows.of_kind(kind))
        groups = sequence_groups(evaluation)
        plot_path = os.path.join(out, SUMMARY_FIGURE)
        _summary_figure(plot_path, evaluation, groups, title, ecfg.plot_episodes)
        cards = write_media(ecfg, out, evaluation, groups)
        if ecfg.report:
            page = os.path.join(out, REPORT_FILE)
            _report(page, cfg, evaluation, summary, title, (plot_path, cards))
    return ecfg.report


def sequence_groups(evaluation: Evaluation) -> dict[int, str]:
    """Sequence index -> outcome group (success, partial, failure) or ``rewound``."""
    rows = evaluation.scores.model
    episodes = rows.indices("episode")
    groups = dict(zip(episodes, outcome_groups(rows, episodes, evaluation.stages.task_stages)))
    groups.update({i: "rewound" for i in rows.indices("rewound")})
    return groups


def _summary_figure(path: str, evaluation: Evaluation, groups, title: str, per_class: int):
    from rayrm.evaluate.figures import summary_figure

    scores, found = evaluation.scores, evaluation.metrics
    episode_groups = [groups[i] for i in scores.model.indices("episode")]
    summary_figure(
        path,
        scores.model,
        scores.blind,
        found["model"],
        found.get("blind"),
        episode_groups,
        title,
        per_class=per_class,
    )


def _balanced_order(groups: dict[int, str]) -> list[int]:
    """Sequence indices interleaved over the groups, so any prefix of it shows each kind."""
    buckets: dict[str, list[int]] = {}
    for i, group in groups.items():
        buckets.setdefault(group, []).append(i)
    kinds = ("success", "partial", "failure", "rewound")
    lists = [buckets[g] for g in kinds if g in buckets]
    order = []
    while any(lists):
        for bucket in lists:
            if bucket:
                order.append(bucket.pop(0))
    return order


def _limit(n: int, total: int) -> int:
    return total if n < 0 else min(n, total)


def write_media(
    ecfg: EvaluateConfig, out: str, evaluation: Evaluation, groups: dict[int, str]
) -> list[dict]:
    """Per-episode figures and videos in the local folder ``out``; one card per episode
    shown (its files and group) for the report."""
    rows, blind = evaluation.scores.model, evaluation.scores.blind
    order = _balanced_order(groups)
    figures = order[: _limit(ecfg.episode_figures, len(order))]
    with_video = set(figures[: _limit(ecfg.videos, len(figures))])
    jobs = [
        MediaJob(
            row=rows.row(i),
            blind=None if blind is None else blind.row(i),
            stage_names=evaluation.stages.names,
            num_stages=max(evaluation.stages.model_stages, 1),
            output=out,
            video=i in with_video,
            camera=evaluation.camera,
            fps=ecfg.fps,
        )
        for i in figures
    ]
    results = render_all(jobs)
    return [
        {"episode_id": r.episode_id, "png": r.png, "video": r.video, "group": groups[i]}
        for i, r in zip(figures, results)
    ]


def _report(
    path: str, cfg: Config, evaluation: Evaluation, summary: dict, title: str, figures: tuple
):
    """The HTML page; ``figures`` are the summary figure's path and the episode cards."""
    from rayrm.evaluate.html import write_report

    ecfg, stages = cfg.evaluate, evaluation.stages
    plot_path, cards = figures
    rows, controls, found = evaluation.scores.model, evaluation.controls, evaluation.metrics
    model = f"SARM, K={stages.model_stages} ({', '.join(stages.names)})"
    facts = {
        "checkpoint": evaluation.checkpoint,
        "blind control": controls.get("blind", "none (set evaluate.blind_checkpoint)"),
        "success-only control": controls.get(
            "success_only", "none (set evaluate.success_only_checkpoint)"
        ),
        "model": model if stages.model_stages else "continuous",
        "episodes": f"{len(rows.indices('episode'))} ({ecfg.split}) from "
        f"{ecfg.input or ecfg.embeddings}",
        "rewound copies": len(rows.indices("rewound")),
        "largest |prefix - causal|": f"{summary['causal_max_abs_diff']:.1e}",
    }
    write_report(
        path,
        title,
        facts,
        found["model"],
        found.get("blind"),
        plot_path,
        cards,
        ecfg.embed_videos_mb,
        instruction=summary["instruction"],
        failure_columns=failure_columns(found),
    )
