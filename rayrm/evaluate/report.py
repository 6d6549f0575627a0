"""Metrics of every curve kind, and the metrics JSON / CSV.

Curves come as columns (lists, one entry per scored sequence; see ``curves.CURVE_SCHEMA``).
Recorded episodes (``kind == "episode"``) give the usual metrics; rewound copies of the
experts (``kind == "rewound"``) only the rewind metrics. Metric names, per curve kind:

=============================  ==============================================================
metric                         meaning
=============================  ==============================================================
``voc_expert``/``_failure``    mean VOC (Spearman of value vs time) over expert/failed episodes
``mse_expert``                 MSE to (t+1)/T over expert episodes
``mse_stage_target``           SARM: MSE to the stage target (cum. prior + prior x subtask)
``final_expert_mean`` ...      mean final value of expert / failed episodes
``auroc_success_vs_failure``   AUROC of the final value, success vs failure flag
``stage_accuracy``             SARM: share of frames whose predicted stage is the labelled one
``rank_final_<group>``         mean final value of the success / partial / failure group
``rank_mean_<group>``          mean value over frames ("mean reward") of each group
``rank_*_ordered``             those means decrease success > partial > failure
``rank_*_pair_accuracy``       share of cross-group episode pairs ranked in that order
``auroc_vs_<mode>``            AUROC of the final value, successes vs the failures of one
                               failure mode (the episodes' ``failure_mode``; e.g.
                               ``auroc_vs_wrong_target``), with ``num_failure_<mode>``
``success_auroc``              success head (plain prefix curves, models that have one): AUROC
                               of its final "done" probability, success vs failure flag, and
                               ``success_auroc_vs_<mode>`` per failure mode
``hacking_<group>``            episodes flagged as reward hacking (:func:`reward_hacking`) in
                               each outcome group and failure mode; ``hacking_episodes`` all
``rewind_voc_after_turn``      rewound: mean VOC after the turnaround (-1 ideal)
``rewind_fall_rate``           rewound: share whose last value is below the turnaround value
``rewind_drop_mean``           rewound: mean of value at the turnaround - last value
``rewind_mse``                 rewound: MSE to the true progress (rises, then falls)
=============================  ==============================================================

Language (:func:`instruction_metrics`, plain prefix curves only): per task (distinct prompt)
and outcome, the mean final value with the episode's own instruction (``final_true``) and
with a wrong one (``final_wrong``: the mean over the other tasks' instructions, see
``curves``), their ``gap`` and the share of episodes whose true value is above the wrong one
(``true_above_wrong``). Successful and failed episodes are kept apart: a model that reads the
instruction should drop a lot on successes and little on failures, which already score low.

Groups (``metrics.outcome_group``): success = success flag true (or unknown); partial = failed
after reaching more than half of the K stages (from the episode's ``stage_boundaries``: the
synthetic stalls in stage 3, drops and moves back); failure = failed earlier (stalls in stage 2).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from typing import Any

import numpy as np

from rayrm import metrics
from rayrm.evaluate.curves import CURVE_KINDS

logger = logging.getLogger(__name__)


def rows_of_kind(rows: dict[str, list], kind: str) -> list[int]:
    return [i for i, k in enumerate(rows["kind"]) if k == kind]


def outcome_groups(rows: dict[str, list], episodes: list[int], num_stages: int) -> list[str]:
    return [
        metrics.outcome_group(rows["success"][i], len(rows["stage_boundaries"][i]) + 1, num_stages)
        for i in episodes
    ]


def _ranking(scores: list[float], groups: list[str], name: str) -> dict[str, Any]:
    ranking = metrics.rollout_ranking(scores, groups)
    out: dict[str, Any] = {f"rank_{name}_{g}": ranking["means"].get(g) for g in metrics.OUTCOMES}
    out[f"rank_{name}_ordered"] = ranking["ordered"]
    out[f"rank_{name}_pair_accuracy"] = ranking["pair_accuracy"]
    return out


def _episode_metrics(rows: dict, kind: str, episodes: list[int], num_stages: int) -> dict:
    curves = [np.asarray(rows[kind][i], np.float64) for i in episodes]
    success = [rows["success"][i] for i in episodes]
    expert = [c for c, s in zip(curves, success) if s is not False]
    failed = [c for c, s in zip(curves, success) if s is False]
    truth = [rows["true_progress"][i] for i in episodes if rows["success"][i] is not False]
    groups = outcome_groups(rows, episodes, num_stages)
    out = {
        "voc_expert": metrics.mean_voc(expert),
        "voc_failure": metrics.mean_voc(failed),
        "mse_expert": metrics.mse_to_targets(expert, truth),
        "final_expert_mean": float(np.mean([c[-1] for c in expert])) if expert else None,
        "final_failure_mean": float(np.mean([c[-1] for c in failed])) if failed else None,
        "auroc_success_vs_failure": metrics.auroc(
            [c[-1] for c in curves], [s is not False for s in success]
        ),
        "num_expert": len(expert),
        "num_failure": len(failed),
        **{f"num_{g}_group": groups.count(g) for g in metrics.OUTCOMES},
    }
    out.update(_ranking([float(c[-1]) for c in curves], groups, "final"))
    out.update(_ranking([float(c.mean()) for c in curves], groups, "mean"))
    out.update(failure_mode_metrics(rows, kind, episodes))
    return out


def failure_mode_metrics(rows: dict, kind: str, episodes: list[int], prefix: str = "") -> dict:
    """Per failure mode: AUROC of the successes against that mode's failures alone, so an
    easy mode cannot hide a hard one in the pooled AUROC (``<prefix>auroc_vs_<mode>``)."""
    modes = _failure_modes(rows)
    final = {i: float(np.asarray(rows[kind][i])[-1]) for i in episodes}
    successes = [final[i] for i in episodes if rows["success"][i] is not False]
    out = {}
    for mode in sorted({modes[i] for i in episodes if rows["success"][i] is False} - {None}):
        failed = [final[i] for i in episodes if rows["success"][i] is False and modes[i] == mode]
        scores = successes + failed
        labels = [True] * len(successes) + [False] * len(failed)
        out[f"{prefix}auroc_vs_{mode}"] = metrics.auroc(scores, labels)
        if not prefix:
            out[f"num_failure_{mode}"] = len(failed)
    return out


def _failure_modes(rows: dict) -> list[str | None]:
    return rows.get("failure_mode") or [None] * len(rows["success"])


def has_success_head(rows: dict, episodes: list[int]) -> bool:
    predicted = rows.get("success_pred")
    return bool(episodes) and predicted is not None and all(len(predicted[i]) for i in episodes)


def success_head_metrics(rows: dict, episodes: list[int]) -> dict:
    """The success head's AUROC (final "done" probability), pooled and per failure mode."""
    final = [float(rows["success_pred"][i][-1]) for i in episodes]
    labels = [rows["success"][i] is not False for i in episodes]
    return {
        "success_auroc": metrics.auroc(final, labels),
        **failure_mode_metrics(rows, "success_pred", episodes, prefix="success_"),
    }


def reward_hacking(
    rows: dict,
    episodes: list[int],
    groups: list[str],
    progress_at: float = 0.9,
    success_below: float = 0.5,
) -> dict:
    """Episodes whose plain prefix progress rises to ``progress_at`` or more while the success
    head's final "done" probability is below ``success_below``: the reward says done, the
    model's own success head says not. A policy trained on this reward would be paid for
    exactly such episodes, so they are counted per outcome group and failure mode, and listed.
    """
    modes = _failure_modes(rows)
    flagged = [
        (i, g)
        for i, g in zip(episodes, groups)
        if max(rows["prefix"][i]) >= progress_at and rows["success_pred"][i][-1] < success_below
    ]
    out: dict[str, Any] = {
        f"hacking_{g}": sum(f == g for _, f in flagged) for g in metrics.OUTCOMES
    }
    for mode in sorted({modes[i] for i in episodes} - {None}):
        out[f"hacking_{mode}"] = sum(modes[i] == mode for i, _ in flagged)
    out["hacking_episodes"] = [rows["episode_id"][i] for i, _ in flagged]
    return out


def _stage_metrics(rows: dict, kind: str, episodes: list[int]) -> dict:
    """SARM only: stage accuracy and MSE to the stage target, where labels are known."""
    predicted = "causal_stage_pred" if kind == "causal" else "stage_pred"
    labelled = [i for i in episodes if len(rows["true_stage"][i])]
    return {
        "stage_accuracy": metrics.stage_accuracy(
            [rows[predicted][i] for i in labelled], [rows["true_stage"][i] for i in labelled]
        ),
        "mse_stage_target": metrics.mse_to_targets(
            [rows[kind][i] for i in labelled], [rows["true_stage_progress"][i] for i in labelled]
        ),
        "num_stage_labelled": len(labelled),
    }


def _rewind_metrics(rows: dict, kind: str) -> dict:
    rewound = rows_of_kind(rows, "rewound")
    found = metrics.rewind_metrics(
        [rows[kind][i] for i in rewound], [rows["turn"][i] for i in rewound]
    )
    out = {f"rewind_{k}": v for k, v in found.items()}
    out["rewind_mse"] = metrics.mse_to_targets(
        [rows[kind][i] for i in rewound], [rows["true_progress"][i] for i in rewound]
    )
    out["num_rewound"] = len(rewound)
    return out


def curve_metrics(
    rows: dict[str, list],
    kind: str,
    num_stages: int,
    sarm: bool,
    hacking: tuple[float, float] = (0.9, 0.5),
) -> dict:
    """Every metric of one curve kind (table in the module docstring); ``hacking``: the
    progress and success thresholds of :func:`reward_hacking`."""
    episodes = rows_of_kind(rows, "episode")
    out = _episode_metrics(rows, kind, episodes, num_stages)
    if kind == "prefix" and has_success_head(rows, episodes):  # the head reads prefixes
        out.update(success_head_metrics(rows, episodes))
        groups = outcome_groups(rows, episodes, num_stages)
        out.update(reward_hacking(rows, episodes, groups, *hacking))
    if sarm:
        out.update(_stage_metrics(rows, kind, episodes))
    out.update(_rewind_metrics(rows, kind))
    return out


def all_metrics(
    rows: dict[str, list], num_stages: int, sarm: bool, hacking: tuple[float, float] = (0.9, 0.5)
) -> dict[str, dict]:
    return {kind: curve_metrics(rows, kind, num_stages, sarm, hacking) for kind in CURVE_KINDS}


def failure_table_rows(prefix_metrics: dict) -> list[tuple[str, str]]:
    """(label, metric) rows of the per-failure-mode comparison, from one model's prefix
    metrics: AUROC of the final progress and of the success head, pooled and per mode, and
    the reward-hacking counts."""
    modes = [k.removeprefix("auroc_vs_") for k in prefix_metrics if k.startswith("auroc_vs_")]
    rows = [("AUROC success vs failure (progress)", "auroc_success_vs_failure")]
    rows += [(f"  AUROC vs {m} (progress)", f"auroc_vs_{m}") for m in modes]
    rows += [("AUROC success vs failure (success head)", "success_auroc")]
    rows += [(f"  AUROC vs {m} (success head)", f"success_auroc_vs_{m}") for m in modes]
    rows += [(f"reward-hacking flags, {g}", f"hacking_{g}") for g in metrics.OUTCOMES]
    rows += [(f"reward-hacking flags, {m}", f"hacking_{m}") for m in modes]
    return rows


INSTRUCTION_FIELDS = ("num_episodes", "final_true", "final_wrong", "gap", "true_above_wrong")
ALL_TASKS = "all tasks"


def _instruction_row(rows: dict, chosen: list[int], task: str, outcome: str) -> dict:
    true = np.array([rows["prefix"][i][-1] for i in chosen], np.float64)
    wrong = np.array([rows["final_wrong"][i] for i in chosen], np.float64)
    found = len(chosen) > 0
    return {
        "task": task,
        "outcome": outcome,
        "num_episodes": len(chosen),
        "final_true": float(true.mean()) if found else None,
        "final_wrong": float(wrong.mean()) if found else None,
        "gap": float((true - wrong).mean()) if found else None,
        "true_above_wrong": float((true > wrong).mean()) if found else None,
    }


def instruction_metrics(rows: dict[str, list]) -> list[dict] | None:
    """One row per (task, outcome) and per outcome over all tasks (module docstring); None
    when no recorded episode has a wrong-instruction value (fewer than 2 tasks scored)."""
    episodes = [i for i in rows_of_kind(rows, "episode") if rows["final_wrong"][i] is not None]
    if not episodes:
        return None
    out = []
    for task in [*sorted({rows["prompt"][i] for i in episodes}), ALL_TASKS]:
        for outcome in ("success", "failure"):
            chosen = [
                i
                for i in episodes
                if task in (ALL_TASKS, rows["prompt"][i])
                and (rows["success"][i] is not False) == (outcome == "success")
            ]
            out.append(_instruction_row(rows, chosen, task, outcome))
    return out


def instruction_csv(table: list[dict] | None) -> dict[str, Any]:
    """The table as flat metric names for ``metrics.csv``: ``instruction/<outcome>/<field>/
    <task>`` (curve ``prefix``)."""
    return {
        f"instruction/{row['outcome']}/{name}/{row['task']}": row[name]
        for row in table or []
        for name in INSTRUCTION_FIELDS
    }


def causal_gap(rows: dict[str, list]) -> float:
    """Largest |prefix - causal| over all frames: the two code paths must agree."""
    gaps = [np.max(np.abs(np.subtract(p, c))) for p, c in zip(rows["prefix"], rows["causal"])]
    return float(max(gaps, default=0.0))


def json_safe(value):
    """JSON has no NaN: write null instead; numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(json_safe(data), f, indent=2)


def write_csv(path: str, tables: dict[str, dict[str, dict]]) -> None:
    """One row per (model, curve kind, metric): ``tables[model][kind][metric] = value``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "curve", "metric", "value"])
        for model, kinds in tables.items():
            for kind, values in kinds.items():
                for metric, value in values.items():
                    writer.writerow(
                        [model, kind, metric, "" if value is None else json_safe(value)]
                    )


# --------------------------------------------------------------------------- summaries


def instruction_summary(rows: dict, blind_rows: dict | None) -> dict[str, Any]:
    """``metrics.json["instruction"]``: the per-task true vs wrong instruction tables of the
    model and the blind control, or null tables and a note when there is only one task."""
    tasks = sorted({rows["prompt"][i] for i in rows_of_kind(rows, "episode")})
    model = instruction_metrics(rows)
    note = None
    if model is None and len(tasks) < 2:
        note = f"the wrong-instruction check needs >= 2 tasks; the episodes hold {len(tasks)}"
    elif model is None:
        note = "the wrong-instruction check was not made: the embeddings hold no language vector"
    return {
        "tasks": tasks,
        "wrong_instruction": "mean final value over the other tasks' instructions",
        "note": note,
        "model": model,
        "blind": instruction_metrics(blind_rows) if blind_rows else None,
    }


def csv_tables(found: dict[str, dict], instruction: dict) -> dict:
    """metrics.csv: every curve metric of the model and each control, plus the instruction
    table as prefix-curve rows."""
    out = {}
    for name, kinds in found.items():
        prefix = {**kinds["prefix"], **instruction_csv(instruction.get(name))}
        out[name] = {**kinds, "prefix": prefix}
    return out


def failure_columns(found: dict[str, dict]) -> dict[str, dict]:
    """The per-failure-mode comparison's columns, prefix curves: blind, success-only, model."""
    names = {"blind": "blind", "success_only": "success-only", "model": "failure-aware"}
    return {names[n]: found[n]["prefix"] for n in ("blind", "success_only", "model") if n in found}


KEY_METRICS = [
    ("VOC, expert episodes", "voc_expert"),
    ("AUROC success vs failure (final value)", "auroc_success_vs_failure"),
    ("MSE to (t+1)/T, expert episodes", "mse_expert"),
    ("stage accuracy (SARM)", "stage_accuracy"),
    ("ranking pairs success>partial>failure", "rank_final_pair_accuracy"),
    ("rewound: VOC after the turnaround", "rewind_voc_after_turn"),
    ("rewound: share that falls", "rewind_fall_rate"),
]


def metrics_lines(
    model: dict,
    blind: dict | None,
    instruction: dict | None = None,
    success_only: dict | None = None,
) -> list[str]:
    """Key metrics per curve kind, the model beside its controls; then, when a success-only
    control or a success head is there, the per-failure-mode comparison (prefix curves)."""
    lines = [f"{'':42s} {'model':>8s} {'blind':>8s}"]
    for kind in model:
        lines.append(f"-- {kind} curves")
        modes = [k for k in model[kind] if k.startswith("auroc_vs_")]
        labels = [(f"  AUROC vs {k.removeprefix('auroc_vs_')} failures", k) for k in modes]
        for label, key in [*KEY_METRICS[:2], *labels, *KEY_METRICS[2:]]:
            if key not in model[kind]:
                continue
            b = blind[kind].get(key) if blind else None
            lines.append(f"{label:42s} {_text_value(model[kind][key]):>8s} {_text_value(b):>8s}")
    if model and ("success_auroc" in model["prefix"] or success_only):
        found = {"model": model, "blind": blind, "success_only": success_only}
        lines += failure_lines(failure_columns({k: v for k, v in found.items() if v}))
    if instruction is not None:
        lines += instruction_lines(instruction)
    return lines


def failure_lines(columns: dict[str, dict]) -> list[str]:
    """The per-failure-mode table: one column per model (prefix curves), n/a where a model
    has no such metric (the blind control's success head sees zeros, so it is near 0.5)."""
    model = columns["failure-aware"]
    lines = [
        "-- per failure mode (plain prefix curves)",
        f"{'':42s} " + " ".join(f"{name:>13s}" for name in columns),
    ]
    for label, key in failure_table_rows(model):
        values = " ".join(f"{_text_value(c.get(key)):>13s}" for c in columns.values())
        lines.append(f"{label[:42]:42s} {values}")
    return lines


def instruction_lines(instruction: dict) -> list[str]:
    """Final prefix value of the successful episodes per task, true then wrong instruction."""
    if instruction["model"] is None:
        return [f"-- instruction: {instruction['note']}"]
    lines = ["-- final value, true / wrong instruction (prefix, successful episodes)"]
    blind = {(r["task"], r["outcome"]): r for r in instruction["blind"] or []}
    for row in instruction["model"]:
        if row["outcome"] != "success":
            continue
        other = blind.get((row["task"], "success"), {})
        for which in ("true", "wrong"):
            label = f"{row['task'][:33]} | {which}"
            value, b = row[f"final_{which}"], other.get(f"final_{which}")
            lines.append(f"{label:42s} {_text_value(value):>8s} {_text_value(b):>8s}")
    return lines


def log_metrics(
    model: dict, blind: dict | None, instruction: dict | None = None, success_only=None
) -> None:
    lines = metrics_lines(model, blind, instruction, success_only)
    logger.info("evaluation\n%s", "\n".join(lines))


def _text_value(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return "n/a" if value is None or value != value else f"{value:.3f}"
