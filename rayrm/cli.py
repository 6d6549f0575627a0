"""``rayrm <command> [--config FILE] [--section.key VALUE ...]``

Commands: synth, embed, annotate-video (numbered videos to label stages from), annotate (a
stage JSON onto the shards), train, evaluate, pipeline (embed -> train -> evaluate), demo
(synth -> embed [-> annotate] -> train -> evaluate, with a blind control), serve (online
rewards over HTTP and Ray Serve), gvl (zero-shot progress from Qwen3-VL). Each parses its
config, then calls one function; known input problems exit with status 2 and a message,
nothing half-written.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rayrm.backbones import UnknownBackboneError, check_backbone
from rayrm.config import ConfigError, load_config, resolve_paths
from rayrm.data.storage import StorageError
from rayrm.errors import UserError
from rayrm.runtime import init_ray, setup_logging

logger = logging.getLogger("rayrm")

COMMANDS = {
    "synth": "write synthetic episodes (raw HDF5 layout, or LeRobot v3)",
    "embed": "HDF5 episodes or a LeRobot v3 dataset -> Parquet embedding shards (Ray Data)",
    "annotate-video": "per episode an mp4 with frame numbers and a contact sheet, to label stages",
    "annotate": "apply a stage JSON to the embedding shards (stage, subtask_progress columns)",
    "train": "train the reward model on embedding shards (Ray Train)",
    "evaluate": "reward curves, metrics, figures, videos and an HTML report for a checkpoint",
    "score": "a checkpoint and a dataset -> per-frame rewards (LeRobot's columns, RA-BC weights)",
    "pipeline": "embed -> train -> evaluate",
    "demo": "synth -> embed -> train -> evaluate, with a blind control",
    "serve": "online rewards: a checkpoint behind Ray Serve, HTTP on 127.0.0.1 (rayrm.serve)",
    "gvl": "zero-shot progress: Qwen3-VL shown a successful episode in context (GVL)",
}
# The commands that run cfg.backbone: its name and options are checked before Ray starts.
BACKBONE_COMMANDS = {"embed", "evaluate", "score", "pipeline", "demo", "serve"}
# What the user can fix: the message, exit status 2. Anything else (a ValueError too) is a
# bug and keeps its traceback. ConfigError, ShardError and InvalidEpisodesError are UserErrors.
USER_ERRORS = (UserError, UnknownBackboneError, FileNotFoundError, FileExistsError, StorageError)


def _run(command: str, cfg) -> None:
    # Imported here so `rayrm synth` does not pay for torch and Ray Train imports.
    if command == "synth":
        from rayrm.pipeline import run_synth

        run_synth(cfg)
        return
    if command == "gvl":  # one local model, no Ray
        from rayrm.zeroshot.gvl import run_gvl

        run_gvl(cfg.gvl)
        return
    if command in BACKBONE_COMMANDS:
        check_backbone(cfg.backbone)
    init_ray(cfg.ray)
    if command == "embed":
        from rayrm.embed import run_embed

        run_embed(cfg)
    elif command == "annotate-video":
        from rayrm.annotate.videos import run_annotate_video

        run_annotate_video(cfg.annotate)
    elif command == "annotate":
        from rayrm.annotate.labels import run_annotate

        run_annotate(cfg.annotate)
    elif command == "train":
        from rayrm.train.trainer import run_train

        run_train(cfg)
    elif command == "evaluate":
        from rayrm.evaluate.run import run_evaluate

        run_evaluate(cfg)
    elif command == "score":
        from rayrm.score.run import run_score

        run_score(cfg)
    elif command == "pipeline":
        from rayrm.pipeline import run_pipeline

        run_pipeline(cfg)
    elif command == "demo":
        from rayrm.pipeline import run_demo

        run_demo(cfg)
    elif command == "serve":
        from rayrm.serve.app import run_serve

        run_serve(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayrm", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", help="YAML config file (see configs/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = build_parser().parse_known_args(argv)
    try:
        cfg = resolve_paths(load_config(args.config, overrides))
    except (ConfigError, OSError) as err:
        setup_logging()
        logger.error("%s", err)
        return 2
    setup_logging(cfg.log_level)
    try:
        _run(args.command, cfg)
    except USER_ERRORS as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
