"""Evaluate a checkpoint: curves, metrics JSON/CSV, figures, videos, an HTML report.

Input: embedding shards (``evaluate.embeddings``), or raw episodes (``evaluate.input``: HDF5
or a LeRobot v3 root), embedded on the fly through the checkpoint's backbone by the same Ray
Data pipeline as ``rayrm embed`` (nothing written). Either way one Ray Data actor scores the
episodes (and rewound copies of the experts) with :class:`rayrm.evaluate.curves.CurveScorer`.
A blind control (``evaluate.blind_checkpoint``) is scored on the same episodes and shown
beside the model.

The flow, one module a step: ``inputs`` (the episodes, from shards or raw input) ->
``scoring`` (curves: one :class:`~rayrm.evaluate.scoring.ScoredEpisodes` per checkpoint) ->
``report`` (metrics) -> ``outputs`` (files, figures, videos, the page); this module only
strings them together.

Outputs in ``evaluate.output``:

=======================  ===============================================================
file                     content
=======================  ===============================================================
``metrics.json``         every metric per curve kind, model and blind control, plus facts and
                         the per-task true vs wrong instruction table (``instruction``)
``metrics.csv``          the same, one row per (model, curve, metric)
``curves.json``          every curve of every episode (columns of ``curves.CURVE_SCHEMA``)
``rewound_curves.json``  the same for the rewound copies of the expert episodes
``reward_curves.png``    summary: examples, metric bars vs blind, group means, rewound
``episodes/*.png``       per episode: curves, true progress, stage bands, predicted stages
``videos/*.mp4``         per episode: the camera frame beside the growing curve
``report.html``          all of the above in one self-contained page
=======================  ===============================================================

Run: ``rayrm evaluate --config configs/demo.yaml [--evaluate.checkpoint PATH]``. By default
only the checkpoint's held-out episodes are scored (``evaluate.split: val``).

Language: when the scored episodes hold at least 2 tasks (distinct prompts), every recorded
episode is also scored with the other tasks' instructions (``curves.final_values``), and
``metrics.json["instruction"]`` holds, per task, the mean final prefix value with the true and
with a wrong instruction, for the model and the blind control (which reads zeros, so its gap
is 0 by construction: the control shows what "no use of language" looks like). With one task
the table is null and a note says why: there is no wrong instruction to give.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rayrm.config import Config
from rayrm.data import storage
from rayrm.data.shards import read_manifest
from rayrm.evaluate.inputs import episode_ids, source_camera
from rayrm.evaluate.outputs import (
    METRICS_FILE,
    REPORT_FILE,
    SUMMARY_FIGURE,
    Evaluation,
    metrics_summary,
    write_outputs,
)
from rayrm.evaluate.report import all_metrics, log_metrics
from rayrm.evaluate.scoring import (
    ScoredEpisodes,
    Scores,
    score_episodes,
    stage_counts,
)
from rayrm.train.checkpoint import find_checkpoint, read_checkpoint_config

logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "run_evaluate", "score_episodes"]


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    metrics_path: str
    plot_path: str
    report_path: str | None = None
    rows: ScoredEpisodes | None = None
    blind_rows: ScoredEpisodes | None = None
    success_only_rows: ScoredEpisodes | None = None


def run_evaluate(
    cfg: Config,
    checkpoint: str | None = None,
    title: str = "reward model",
    blind_checkpoint: str | None = None,
    success_only_checkpoint: str | None = None,
) -> EvalResult:
    """Score the episodes with the model and its controls, measure, write the outputs."""
    ecfg = cfg.evaluate
    checkpoint = (
        checkpoint or ecfg.checkpoint or find_checkpoint(cfg.train.output, cfg.train.run_name)
    )
    controls = {
        "blind": blind_checkpoint or ecfg.blind_checkpoint,
        "success_only": success_only_checkpoint or ecfg.success_only_checkpoint,
    }
    controls = {name: path for name, path in controls.items() if path}
    storage.check_writable(ecfg.output, "evaluate.output")
    if not ecfg.input:
        read_manifest(ecfg.embeddings)
    checkpoint_config = read_checkpoint_config(checkpoint)
    ids = episode_ids(cfg, checkpoint_config)
    curves = score_episodes(cfg, [checkpoint, *controls.values()], ids)
    scores = Scores(**dict(zip(["model", *controls], curves)))
    stages = stage_counts(cfg, checkpoint_config, scores.model)
    hacking = (ecfg.hacking_progress, ecfg.hacking_success)
    found = {
        name: all_metrics(rows, stages.task_stages, sarm=stages.model_stages > 0, hacking=hacking)
        for name, rows in scores.named().items()
    }
    evaluation = Evaluation(
        checkpoint=checkpoint,
        controls=controls,
        scores=scores,
        stages=stages,
        metrics=found,
        camera=source_camera(cfg, checkpoint_config),
        trained_blind=bool(checkpoint_config["train"].get("blind", False)),
    )
    summary = metrics_summary(ecfg, evaluation)
    wrote_report = write_outputs(cfg, evaluation, summary, title)
    final = storage.absolute(ecfg.output)
    metrics_path = storage.join(final, METRICS_FILE)
    plot_path = storage.join(final, SUMMARY_FIGURE)
    report_path = storage.join(final, REPORT_FILE) if wrote_report else None
    logger.info("wrote %s, %s and %s", metrics_path, plot_path, report_path or "no report")
    log_metrics(
        found["model"], found.get("blind"), summary["instruction"], found.get("success_only")
    )
    return EvalResult(
        summary,
        metrics_path,
        plot_path,
        report_path,
        scores.model,
        scores.blind,
        scores.success_only,
    )
