"""Whole runs: embed -> train -> evaluate, and the demo (synth first, plus a blind control).

The demo answers the first question a user has: does the model see anything? It trains the
same model twice, once on the embeddings and once on all-zero inputs (the blind control), and
reports the same metrics for both, on held-out episodes, for every curve kind (plain prefix,
chained, streaming causal), in one report (``<workdir>/eval/report.html``).

When the training data holds failures and the model learns from them (the default), a third
model is trained on the successes alone (``train.only_successful``), and the report sets the
three side by side per failure mode: blind / success-only / failure-aware. That is the
ablation that shows what the failures taught the model.

With ``model.num_stages > 0`` (``configs/demo_sarm.yaml``) it runs the stage pipeline too:
``rayrm synth`` writes the ground-truth boundaries of its successful episodes as a stage JSON
(``<raw>/stages.json``, the plain form), ``rayrm annotate`` applies it to the shards, and the
SARM model is trained and evaluated on them (stage accuracy, stage bands in the figures).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from rayrm.config import Config, resolve_paths
from rayrm.data.synthetic import write_synthetic_dataset, write_synthetic_lerobot

logger = logging.getLogger(__name__)

DEMO_MARKER = ".rayrm-demo"  # a workdir holding this was made by the demo and may be replaced


def run_synth(cfg: Config) -> Path:
    """Synthetic episodes, and beside them ``stages.json``: the ground-truth boundaries of the
    successful episodes in the plain stage-JSON form, ready for ``rayrm annotate``."""
    from rayrm.annotate.labels import stage_json_from_hdf5, write_stage_json

    if cfg.synth.format == "lerobot":
        boundaries = write_synthetic_lerobot(cfg.synth, cfg.synth.output)
        path = Path(cfg.synth.output)
    else:
        path = write_synthetic_dataset(cfg.synth)
        boundaries = stage_json_from_hdf5([str(path)])
    stages = write_stage_json(str(path.with_name("stages.json")), boundaries)
    logger.info("wrote %s and %s", path, stages)
    return path


def train_and_evaluate(
    cfg: Config,
    title: str,
    blind_checkpoint: str | None = None,
    success_only_checkpoint: str | None = None,
) -> dict:
    from rayrm.evaluate.run import run_evaluate
    from rayrm.train.trainer import run_train

    trained = run_train(cfg)
    evaluated = run_evaluate(
        cfg,
        checkpoint=trained.best_checkpoint,
        title=title,
        blind_checkpoint=blind_checkpoint,
        success_only_checkpoint=success_only_checkpoint,
    )
    return {
        "checkpoint": trained.best_checkpoint,
        "metrics_json": evaluated.metrics_path,
        "plot": evaluated.plot_path,
        "report": evaluated.report_path,
        "curves": evaluated.metrics["curves"],
        "blind_control": evaluated.metrics["blind_control"],
        "success_only_control": evaluated.metrics["success_only_control"],
        "instruction": evaluated.metrics["instruction"],
    }


def annotate_if_staged(cfg: Config) -> None:
    if cfg.model.num_stages > 0:
        from rayrm.annotate.labels import run_annotate

        run_annotate(cfg.annotate)


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """embed [-> annotate] -> train -> evaluate with the paths in ``cfg`` (already resolved)."""
    from rayrm.embed import run_embed

    run_embed(cfg)
    annotate_if_staged(cfg)
    return train_and_evaluate(cfg, title="reward model")


def blind_variant(cfg: Config) -> Config:
    work = cfg.workdir.rstrip("/")
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, blind=True, run_name=f"{cfg.train.run_name}_blind"),
        evaluate=dataclasses.replace(cfg.evaluate, output=f"{work}/eval_blind"),
    )


def success_only_variant(cfg: Config) -> Config:
    """The same model trained on the successes alone: the ablation of failure-aware training."""
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(
            cfg.train, only_successful=True, run_name=f"{cfg.train.run_name}_success_only"
        ),
    )


def learns_from_failures(cfg: Config) -> bool:
    """The demo's data holds failures and the model is trained on them."""
    return cfg.synth.failure_fraction > 0 and not cfg.train.only_successful


def _prepare_workdir(path: str) -> None:
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.exists(os.path.join(path, DEMO_MARKER)):
            raise FileExistsError(f"{path} is not empty and was not made by the demo")
        shutil.rmtree(path)
    os.makedirs(path)
    open(os.path.join(path, DEMO_MARKER), "w").close()


def run_demo(cfg: Config) -> dict[str, Any]:
    from rayrm.embed import run_embed
    from rayrm.evaluate.report import write_json
    from rayrm.train.trainer import run_train

    cfg = resolve_paths(cfg)
    _prepare_workdir(cfg.workdir)
    run_synth(cfg)
    embedded = run_embed(cfg)
    annotate_if_staged(cfg)
    # The controls first, so the model's report shows them beside it.
    blind = run_train(blind_variant(cfg))
    success_only = run_train(success_only_variant(cfg)) if learns_from_failures(cfg) else None
    kind = f"SARM, {cfg.model.num_stages} stages" if cfg.model.num_stages else "continuous"
    model = train_and_evaluate(
        cfg,
        title=f"reward model ({kind}, {cfg.backbone.name} backbone)",
        blind_checkpoint=blind.best_checkpoint,
        success_only_checkpoint=success_only.best_checkpoint if success_only else None,
    )
    summary = {
        "raw_episodes": cfg.synth.output,
        "embeddings": embedded.output,
        "embed_frames_per_s": embedded.frames_per_second,
        "model": {
            k: v for k, v in model.items() if k not in ("blind_control", "success_only_control")
        },
        "blind_control": {"checkpoint": blind.best_checkpoint, "curves": model["blind_control"]},
        "success_only_control": None
        if success_only is None
        else {"checkpoint": success_only.best_checkpoint, "curves": model["success_only_control"]},
    }
    write_json(os.path.join(cfg.workdir, "summary.json"), summary)
    log_summary(summary, os.path.join(cfg.workdir, "summary.json"))
    return summary


def log_summary(summary: dict[str, Any], path: str) -> None:
    from rayrm.evaluate.report import metrics_lines

    curves = summary["model"]["curves"], summary["blind_control"]["curves"]
    success_only = (summary.get("success_only_control") or {}).get("curves")
    lines = metrics_lines(*curves, summary["model"].get("instruction"), success_only)
    logger.info("demo results (held-out episodes)\n%s", "\n".join(lines))
    logger.info(
        "outputs:\n  raw episodes   %s\n  embeddings     %s\n  model          %s\n"
        "  blind control  %s\n  metrics        %s\n  summary figure %s\n  report         %s\n"
        "  summary        %s",
        summary["raw_episodes"],
        summary["embeddings"],
        summary["model"]["checkpoint"],
        summary["blind_control"]["checkpoint"],
        summary["model"]["metrics_json"],
        summary["model"]["plot"],
        summary["model"]["report"],
        path,
    )
