"""Evaluate a checkpoint: curves, metrics JSON/CSV, figures, videos, an HTML report.

Input: embedding shards (``evaluate.embeddings``), or raw episodes (``evaluate.input``: HDF5
or a LeRobot v3 root), embedded on the fly through the checkpoint's backbone by the same Ray
Data pipeline as ``rayrm embed`` (nothing written). Either way one Ray Data actor scores the
episodes (and rewound copies of the experts) with :class:`rayrm.evaluate.curves.CurveScorer`.
A blind control (``evaluate.blind_checkpoint``) is scored on the same episodes and shown
beside the model.

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

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from rayrm.config import BackboneConfig, Config, from_dict
from rayrm.data import schema, storage
from rayrm.data.chunks import whole_episode_table
from rayrm.data.hdf5 import InvalidEpisodesError
from rayrm.data.shards import (
    EpisodeReader,
    episode_dataset,
    read_episode_index,
    read_manifest,
)
from rayrm.data.sources import scan_raw_input
from rayrm.errors import UserError
from rayrm.evaluate.curves import CurveScorer
from rayrm.evaluate.media import MediaJob, render_all
from rayrm.evaluate.report import (
    all_metrics,
    causal_gap,
    failure_table_rows,
    instruction_csv,
    instruction_metrics,
    outcome_groups,
    rows_of_kind,
    write_csv,
    write_json,
)
from rayrm.runtime import quiet_datasets
from rayrm.train.checkpoint import find_checkpoint, read_checkpoint_config

logger = logging.getLogger(__name__)

_EPISODES_PER_GROUP = 64  # raw input: episodes assembled per groupby partition


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    metrics_path: str
    plot_path: str
    report_path: str | None = None
    rows: dict[str, list] | None = None
    blind_rows: dict[str, list] | None = None
    success_only_rows: dict[str, list] | None = None


# --------------------------------------------------------------------------- inputs


def _episode_ids(cfg: Config, checkpoint_config: dict) -> list[str] | None:
    """Episodes to score; None = every episode of the raw input."""
    split = cfg.evaluate.split
    if split == "val":
        return checkpoint_config["split"]["val_episodes"]
    if split != "all":
        raise UserError(f"evaluate.split must be 'val' or 'all', got {split!r}")
    if cfg.evaluate.input:
        return None
    return read_episode_index(cfg.evaluate.embeddings).column("episode_id").to_pylist()


def shard_episode_dataset(embeddings: str, ids: list[str]) -> ray.data.Dataset:
    """Whole episode rows of ``ids`` from embedding shards, with the columns scoring needs."""
    present = EpisodeReader(embeddings).columns()
    optional = ("source_file", "failure_mode", *schema.STAGE_COLUMNS)
    extra = [c for c in optional if c in present]
    return episode_dataset(embeddings, ids, columns=schema.TRAIN_COLUMNS + extra)


def _shard_instructions(embeddings: str, ids: list[str]) -> dict[str, list[float]]:
    """prompt -> language embedding of each task among the episodes ``ids`` (taken from the
    first of its episodes: the embedding depends on the prompt alone)."""
    table = EpisodeReader(embeddings).index()
    keep = pc.is_in(table.column("episode_id"), value_set=pa.array(ids, pa.string()))
    table = table.filter(keep)
    found: dict[str, list[float]] = {}
    prompts = table.column("prompt").to_pylist()
    vectors = table.column("language_embedding").to_pylist()
    for prompt, vector in zip(prompts, vectors):
        found.setdefault(prompt, vector)
    return found


def wrong_instructions(language: dict[str, Any]) -> dict[str, Any] | None:
    """The instructions to score episodes with as wrong ones, or None (logged) when the check
    cannot be made: fewer than 2 tasks, or no language embedding at all."""
    if len(language) < 2:
        logger.info(
            "wrong-instruction check skipped: it needs >= 2 tasks (distinct prompts); the "
            "evaluated episodes hold %d (%s)",
            *(len(language), ", ".join(repr(p) for p in sorted(language)) or "none"),
        )
        return None
    if all(len(v) == 0 for v in language.values()):
        logger.info("wrong-instruction check skipped: the embeddings hold no language vector")
        return None
    logger.info("wrong-instruction check over %d tasks", len(language))
    return language


def _checkpoint_camera(checkpoint_config: dict) -> str:
    """The camera the checkpoint's embeddings were made from, when their manifest is around."""
    embeddings = checkpoint_config.get("embeddings")
    if embeddings and storage.exists(storage.join(embeddings, schema.MANIFEST_NAME)):
        return read_manifest(embeddings).get("camera", "side_cam")
    return "side_cam"


def source_camera(cfg: Config, checkpoint_config: dict) -> str:
    """The camera to embed raw input from and to show in videos: ``evaluate.camera``, else
    the one the evaluated (or, for raw input, the checkpoint's) embeddings were made from."""
    if cfg.evaluate.camera:
        return cfg.evaluate.camera
    if cfg.evaluate.input:
        return _checkpoint_camera(checkpoint_config)
    return read_manifest(cfg.evaluate.embeddings).get("camera", "side_cam")


def raw_sources(cfg: Config, checkpoint_config: dict) -> tuple[list[str], str | None]:
    """(cameras, state) to embed raw input from: a checkpoint that fuses several cameras or
    the robot state needs every one of them, in its order (``evaluate.camera`` then only
    picks the camera the videos show); otherwise the one camera of :func:`source_camera`."""
    if "frame_layout" in checkpoint_config:
        layout = schema.FrameLayout.from_manifest(checkpoint_config)
        if not layout.single_camera:
            return list(layout.cameras), layout.state_key
    return [source_camera(cfg, checkpoint_config)], None


def scan_raw_episodes(cfg: Config, checkpoint_config: dict, ids: list[str] | None):
    """The episodes of ``evaluate.input`` (only ``ids`` when given), from the cameras (and
    state) the checkpoint was trained on (:func:`raw_sources`)."""
    ecfg = cfg.evaluate
    cameras, state = raw_sources(cfg, checkpoint_config)
    # a LeRobot root's success flags: the column the embeddings were made with (embed section)
    success_column = cfg.embed.success_column
    episodes, problems = scan_raw_input(ecfg.input, cameras, ecfg.prompt, success_column, state)
    if problems:
        raise InvalidEpisodesError(problems)
    if ids is not None:
        episodes = [e for e in episodes if e.episode_id in set(ids)]
        if not episodes:
            raise UserError(
                f"none of the checkpoint's held-out episodes is in {ecfg.input}; "
                "use --evaluate.split all to score every episode there"
            )
    return episodes


def raw_episode_dataset(cfg: Config, checkpoint_config: dict, episodes: list):
    """Raw ``episodes`` (HDF5, or one camera of a LeRobot v3 root) through the checkpoint's
    backbone (``rayrm.embed``'s pipeline) as whole episode rows, and the prompt vectors of
    their tasks."""
    from rayrm.embed import build_dataset, describe_backbone

    backbone = from_dict(BackboneConfig, checkpoint_config["backbone"])
    cameras, state = raw_sources(cfg, checkpoint_config)
    prompts = sorted({e.prompt for e in episodes})  # the scored episodes' tasks
    task = ray.remote(describe_backbone).options(
        num_gpus=cfg.embed.num_gpus_per_actor, num_cpus=cfg.embed.num_cpus_per_actor
    )
    language, visual_dim, language_dim = ray.get(task.remote(backbone, prompts))
    view_dims = checkpoint_config.get("view_dims") or [checkpoint_config["visual_dim"]]
    expected = (view_dims[0], checkpoint_config["language_dim"])
    if (visual_dim, language_dim) != tuple(expected):
        raise UserError(
            f"backbone '{backbone.name}' gives dims {(visual_dim, language_dim)}, the "
            f"checkpoint expects {tuple(expected)}"
        )
    logger.info(
        "embedding %d raw episodes on the fly (camera %s%s)",
        len(episodes),
        ", ".join(cameras),
        f", state {state}" if state else "",
    )
    embed = dataclasses.replace(
        cfg.embed,
        camera=cameras[0],
        cameras=cameras if len(cameras) > 1 else [],
        camera_as_episode=False,
        state=state,
    )
    embed_cfg = dataclasses.replace(cfg, backbone=backbone, embed=embed)
    # each frame's values in the frame layout's order: the cameras, then the state
    columns = [schema.view_column(i, c) for i, c in enumerate(cameras)]
    columns += [schema.STATE_COLUMN] if state else []
    # Frame embeddings -> one row per episode, inside Ray Data (a groupby: scoring needs
    # whole episodes, and the embedding pipeline cuts them into blocks).
    groups = max(1, len(episodes) // _EPISODES_PER_GROUP)
    return (
        build_dataset(embed_cfg, episodes)
        .groupby("episode_id", num_partitions=groups)
        .map_groups(
            _episode_row,
            fn_kwargs={
                "episodes": {e.episode_id: e for e in episodes},
                "language": language,
                "columns": columns,
            },
            batch_format="numpy",
        )
    ), language


def _episode_row(frames: dict, episodes: dict, language: dict, columns: list[str]) -> pa.Table:
    """All frame embeddings of one episode -> its row in the embedding-shard layout (each
    frame's cameras and state side by side, as the shards' reader hands them out)."""
    info = episodes[str(frames["episode_id"][0])]
    order = np.argsort(frames["frame_index"], kind="stable")
    if not np.array_equal(frames["frame_index"][order], np.arange(info.num_frames)):
        raise RuntimeError(f"episode {info.episode_id}: frames missing or repeated")
    parts = [np.asarray(frames[c], np.float32).reshape(len(order), -1) for c in columns]
    visual = np.hstack(parts)[order]
    return whole_episode_table([(info, visual)], language)


def score_episodes(
    cfg: Config, checkpoints: str | list[str], ids: list[str] | None
) -> dict[str, list] | list[dict[str, list]]:
    """Curves of the episodes (and rewound copies), as columns of lists sorted by id; one such
    dict per checkpoint when given a list (all scored in one pass over the data)."""
    ecfg = cfg.evaluate
    several = isinstance(checkpoints, list)
    checkpoints = checkpoints if several else [checkpoints]
    checkpoint_config = read_checkpoint_config(checkpoints[0])
    rewind = (ecfg.rewind_turn, ecfg.rewind_back) if ecfg.rewind else None
    with quiet_datasets():
        if ecfg.input:
            episodes = scan_raw_episodes(cfg, checkpoint_config, ids)
            dataset, language = raw_episode_dataset(cfg, checkpoint_config, episodes)
        else:
            dataset = shard_episode_dataset(ecfg.embeddings, ids)
            language = _shard_instructions(ecfg.embeddings, ids)
        dataset = dataset.map_batches(
            CurveScorer,
            fn_constructor_kwargs={
                "checkpoints": checkpoints,
                "batch_size": ecfg.batch_size,
                "rewind": rewind,
                "instructions": wrong_instructions(language),
            },
            batch_size=16,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0,
        )
        tables = list(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    if not tables:
        raise RuntimeError("no episode was scored")
    table = pa.concat_tables(tables)
    out = [_columns(table, index, ids) for index in range(len(checkpoints))]
    return out if several else out[0]


def _columns(table: pa.Table, index: int, ids: list[str] | None) -> dict[str, list]:
    """One checkpoint's rows as columns of lists, sorted by episode id."""
    table = table.filter(pc.equal(table.column("scorer"), index)).drop_columns(["scorer"])
    table = table.sort_by("episode_id")
    scored = set(table.column("source_episode").to_pylist())
    if ids is not None and scored != set(ids):
        missing = sorted(set(ids) - scored)[:5]
        raise RuntimeError(f"scored {len(scored)} of {len(set(ids))} episodes; missing {missing}")
    return {name: table.column(name).to_pylist() for name in table.column_names}


# --------------------------------------------------------------------------- stages


def stage_facts(cfg: Config, checkpoint_config: dict, rows: dict) -> tuple[int, list[str], int]:
    """(K of the model, stage names, K used to tell partial from failed episodes)."""
    model_stages = int(checkpoint_config["model"].get("num_stages", 0) or 0)
    manifest = {}
    if not cfg.evaluate.input and cfg.evaluate.embeddings:
        manifest = read_manifest(cfg.evaluate.embeddings)
    names = checkpoint_config.get("stage_names") or manifest.get("stage_names") or []
    k = model_stages or int(manifest.get("num_stages", 0) or 0)
    if not k:  # ground-truth boundaries of successful episodes say how many stages there are
        counts = [len(b) + 1 for b, s in zip(rows["stage_boundaries"], rows["success"]) if s]
        k = max(counts, default=0)
    names = list(names) + [f"stage {i + 1}" for i in range(len(names), k)]
    return model_stages, names, k


# --------------------------------------------------------------------------- outputs


def _balanced_order(rows: dict, groups: dict[int, str]) -> list[int]:
    """Sequence indices interleaved over the groups, so any prefix of it shows each kind."""
    buckets: dict[str, list[int]] = {}
    for i, group in groups.items():
        buckets.setdefault(group, []).append(i)
    order, lists = (
        [],
        [buckets[g] for g in ("success", "partial", "failure", "rewound") if g in buckets],
    )
    while any(lists):
        for bucket in lists:
            if bucket:
                order.append(bucket.pop(0))
    return order


def _limit(n: int, total: int) -> int:
    return total if n < 0 else min(n, total)


def _row(rows: dict, i: int) -> dict:
    return {name: values[i] for name, values in rows.items()}


def write_media(
    cfg: Config, out: str, rows, blind_rows, names, k_model, groups, camera
) -> list[dict]:
    """Per-episode figures and videos in the local folder ``out``."""
    ecfg = cfg.evaluate
    order = _balanced_order(rows, groups)
    figures = order[: _limit(ecfg.episode_figures, len(order))]
    with_video = set(figures[: _limit(ecfg.videos, len(figures))])
    jobs = [
        MediaJob(
            row=_row(rows, i),
            blind=None if blind_rows is None else _row(blind_rows, i),
            stage_names=names,
            num_stages=max(k_model, 1),
            output=out,
            video=i in with_video,
            camera=camera,
            fps=ecfg.fps,
        )
        for i in figures
    ]
    results = render_all(jobs)
    return [
        {"episode_id": r.episode_id, "png": r.png, "video": r.video, "group": groups[i]}
        for i, r in zip(figures, results)
    ]


def _groups(rows: dict, k: int) -> dict[int, str]:
    episodes = rows_of_kind(rows, "episode")
    groups = dict(zip(episodes, outcome_groups(rows, episodes, k)))
    groups.update({i: "rewound" for i in rows_of_kind(rows, "rewound")})
    return groups


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


def _csv_tables(found: dict[str, dict], instruction: dict) -> dict:
    """metrics.csv: every curve metric of the model and each control, plus the instruction
    table as prefix-curve rows."""
    out = {}
    for name, kinds in found.items():
        prefix = {**kinds["prefix"], **instruction_csv(instruction.get(name))}
        out[name] = {**kinds, "prefix": prefix}
    return out


def run_evaluate(
    cfg: Config,
    checkpoint: str | None = None,
    title: str = "reward model",
    blind_checkpoint: str | None = None,
    success_only_checkpoint: str | None = None,
) -> EvalResult:
    from rayrm.evaluate.figures import summary_figure
    from rayrm.evaluate.html import write_report

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
    ids = _episode_ids(cfg, checkpoint_config)
    scored = dict(
        zip(["model", *controls], score_episodes(cfg, [checkpoint, *controls.values()], ids))
    )
    rows, blind_rows = scored["model"], scored.get("blind")
    k_model, names, k = stage_facts(cfg, checkpoint_config, rows)
    hacking = (ecfg.hacking_progress, ecfg.hacking_success)
    found = {
        name: all_metrics(r, k, sarm=k_model > 0, hacking=hacking) for name, r in scored.items()
    }
    model_metrics, blind_metrics = found["model"], found.get("blind")
    result = {
        "checkpoint": checkpoint,
        "blind_checkpoint": controls.get("blind"),
        "success_only_checkpoint": controls.get("success_only"),
        "input": ecfg.input or ecfg.embeddings,
        "split": ecfg.split,
        "blind": bool(checkpoint_config["train"].get("blind", False)),
        "num_stages": k_model,
        "stage_names": names if k_model else [],
        "causal_max_abs_diff": causal_gap(rows),
        "curves": model_metrics,
        "blind_control": blind_metrics,
        "success_only_control": found.get("success_only"),
        "instruction": instruction_summary(rows, blind_rows),
    }
    # Figures, videos and the page are made by libraries that write local files: on a URL
    # output they are made in a local folder and uploaded when all are done.
    with storage.staged_output(ecfg.output) as out:
        metrics_path = os.path.join(out, "metrics.json")
        write_json(metrics_path, result)
        csv_tables = _csv_tables(found, result["instruction"])
        write_csv(os.path.join(out, "metrics.csv"), csv_tables)
        for name, kind in (("curves.json", "episode"), ("rewound_curves.json", "rewound")):
            keep = rows_of_kind(rows, kind)
            write_json(os.path.join(out, name), {k: [v[i] for i in keep] for k, v in rows.items()})
        groups = _groups(rows, k)
        plot_path = os.path.join(out, "reward_curves.png")  # the summary figure
        episode_groups = [groups[i] for i in rows_of_kind(rows, "episode")]
        summary_figure(
            plot_path,
            rows,
            blind_rows,
            model_metrics,
            blind_metrics,
            episode_groups,
            title,
            per_class=ecfg.plot_episodes,
        )
        camera = source_camera(cfg, checkpoint_config)
        cards = write_media(cfg, out, rows, blind_rows, names, k_model, groups, camera)
        report_path = None
        if ecfg.report:
            facts = {
                "checkpoint": checkpoint,
                "blind control": controls.get("blind", "none (set evaluate.blind_checkpoint)"),
                "success-only control": controls.get(
                    "success_only", "none (set evaluate.success_only_checkpoint)"
                ),
                "model": f"SARM, K={k_model} ({', '.join(names)})" if k_model else "continuous",
                "episodes": f"{len(rows_of_kind(rows, 'episode'))} ({ecfg.split}) from "
                f"{ecfg.input or ecfg.embeddings}",
                "rewound copies": len(rows_of_kind(rows, "rewound")),
                "largest |prefix - causal|": f"{result['causal_max_abs_diff']:.1e}",
            }
            report_path = write_report(
                os.path.join(out, "report.html"),
                title,
                facts,
                model_metrics,
                blind_metrics,
                plot_path,
                cards,
                ecfg.embed_videos_mb,
                instruction=result["instruction"],
                failure_columns=failure_columns(found),
            )
    final = storage.absolute(ecfg.output)
    metrics_path = storage.join(final, "metrics.json")
    plot_path = storage.join(final, "reward_curves.png")
    report_path = storage.join(final, "report.html") if report_path else None
    logger.info("wrote %s, %s and %s", metrics_path, plot_path, report_path or "no report")
    log_metrics(model_metrics, blind_metrics, result["instruction"], found.get("success_only"))
    return EvalResult(
        result, metrics_path, plot_path, report_path, rows, blind_rows, scored.get("success_only")
    )


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
            lines.append(f"{label:42s} {_fmt(model[kind][key]):>8s} {_fmt(b):>8s}")
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
        values = " ".join(f"{_fmt(c.get(key)):>13s}" for c in columns.values())
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
            lines.append(f"{label:42s} {_fmt(value):>8s} {_fmt(b):>8s}")
    return lines


def log_metrics(
    model: dict, blind: dict | None, instruction: dict | None = None, success_only=None
) -> None:
    lines = metrics_lines(model, blind, instruction, success_only)
    logger.info("evaluation\n%s", "\n".join(lines))


def _fmt(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return "n/a" if value is None or value != value else f"{value:.3f}"
