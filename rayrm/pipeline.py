"""Whole runs: embed -> train -> evaluate, and the demo (synth first, plus a blind control).

The demo answers the first question a user has: does the model see anything? It trains the
same model twice, once on the embeddings and once on all-zero inputs (the blind control), and
reports the same metrics for both, on held-out episodes, for plain prefix curves and for the
seed's chained curves.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Any

from rayrm.config import Config, resolve_paths
from rayrm.data.synthetic import write_synthetic_dataset
from rayrm.embed import run_embed
from rayrm.evaluate.report import write_json
from rayrm.evaluate.run import run_evaluate
from rayrm.train.trainer import run_train

logger = logging.getLogger(__name__)

DEMO_MARKER = ".rayrm-demo"  # a workdir holding this was made by the demo and may be replaced


def train_and_evaluate(cfg: Config, title: str) -> dict[str, Any]:
    trained = run_train(cfg)
    evaluated = run_evaluate(cfg, checkpoint=trained.best_checkpoint, title=title)
    return {
        "checkpoint": trained.best_checkpoint,
        "metrics_json": evaluated.metrics_path,
        "plot": evaluated.plot_path,
        "curves": evaluated.metrics["curves"],
    }


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """embed -> train -> evaluate with the paths in ``cfg`` (already resolved)."""
    run_embed(cfg)
    return train_and_evaluate(cfg, title="reward model")


def blind_variant(cfg: Config) -> Config:
    work = cfg.workdir.rstrip("/")
    return dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, blind=True, run_name=f"{cfg.train.run_name}_blind"),
        evaluate=dataclasses.replace(cfg.evaluate, output=f"{work}/eval_blind"),
    )


def _prepare_workdir(path: str) -> None:
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.exists(os.path.join(path, DEMO_MARKER)):
            raise FileExistsError(f"{path} is not empty and was not made by the demo")
        shutil.rmtree(path)
    os.makedirs(path)
    open(os.path.join(path, DEMO_MARKER), "w").close()


def run_demo(cfg: Config) -> dict[str, Any]:
    cfg = resolve_paths(cfg)
    _prepare_workdir(cfg.workdir)
    write_synthetic_dataset(cfg.synth)
    embedded = run_embed(cfg)
    model = train_and_evaluate(cfg, title="reward model (tiny backbone)")
    blind = train_and_evaluate(blind_variant(resolve_paths(cfg)), title="blind control")
    summary = {
        "raw_episodes": cfg.synth.output,
        "embeddings": embedded.output,
        "embed_frames_per_s": embedded.frames_per_second,
        "model": model,
        "blind_control": blind,
    }
    write_json(os.path.join(cfg.workdir, "summary.json"), summary)
    log_summary(summary, os.path.join(cfg.workdir, "summary.json"))
    return summary


def log_summary(summary: dict[str, Any], path: str) -> None:
    rows = [
        ("VOC, expert episodes", "voc_expert"),
        ("AUROC success vs failure (final value)", "auroc_success_vs_failure"),
        ("MSE to (t+1)/T, expert episodes", "mse_expert"),
        ("mean final value, expert", "final_expert_mean"),
        ("mean final value, failure", "final_failure_mean"),
    ]
    lines = [f"{'held-out episodes':42s} {'model':>8s} {'blind':>8s}"]
    for kind in ("prefix", "chained"):
        lines.append(f"-- {kind} curves")
        for label, key in rows:
            a = summary["model"]["curves"][kind][key]
            b = summary["blind_control"]["curves"][kind][key]
            lines.append(f"{label:42s} {_fmt(a):>8s} {_fmt(b):>8s}")
    logger.info("demo results\n%s", "\n".join(lines))
    logger.info(
        "outputs:\n  raw episodes   %s\n  embeddings     %s\n  model          %s\n"
        "  metrics        %s\n  plot           %s\n  blind control  %s\n  summary        %s",
        summary["raw_episodes"],
        summary["embeddings"],
        summary["model"]["checkpoint"],
        summary["model"]["metrics_json"],
        summary["model"]["plot"],
        summary["blind_control"]["plot"],
        path,
    )


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"
