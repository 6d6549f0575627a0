"""One config tree for every rayrm command.

A run is described by :class:`Config`: one dataclass per stage (synth, backbone, embed,
annotate, model, train, evaluate, ray). YAML files in ``configs/`` set any subset of the
fields, and command-line overrides set single fields by dotted path::

    rayrm train --config configs/demo.yaml --train.lr 3e-4 --model.num_layers=2

Unknown keys are errors (a typo must not silently fall back to a default). Paths left empty
are derived from ``workdir`` by :func:`resolve_paths`, so one ``workdir`` is enough for the
demo, while a cluster job can point each stage at its own (local or remote) location.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayrm.errors import UserError


class ConfigError(UserError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``3e-4`` and ``1e5`` are floats (YAML 1.2), not strings.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent (``3.0e-4``), so
    ``lr: 3e-4`` or ``--train.lr 3e-4`` would otherwise be the string "3e-4" and be rejected.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: Any, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None


_NULLS = ("", "~", "null", "Null", "NULL")

# Settings' vocabularies, declared here so the config is checked when it is built and the
# code that reads a setting names the same choices.
BACKBONE_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
TRAIN_LOGGERS = ("tensorboard", "wandb", "mlflow")  # rayrm.train.tracking's trackers
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class _Override:
    """A command-line value before it meets its field: typed by YAML, unless the field is a
    string, which takes the text as written (``--train.run_name 001`` stays "001", a prompt
    may contain ": " or "#")."""

    raw: str
    key: str

    def value(self) -> Any:
        return None if self.raw.strip() in _NULLS else _load_yaml(self.raw, self.key)


def _plain(value: Any) -> Any:
    """Command-line values inside a mapping (``--backbone.options.attn sdpa``) -> YAML values."""
    if isinstance(value, _Override):
        return value.value()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


SYNTH_FORMATS = ("hdf5", "lerobot")
SYNTH_FAILURE_MODES = ("stall", "drop", "backward")  # the default cycle (failure_modes empty)
SYNTH_HARD_FAILURE_MODES = ("wrong_target", "stop_short")  # need the tray (distractor)
SYNTH_DESTINATIONS = ("pot", "tray")


@dataclass
class SynthConfig:
    """Synthetic episodes in the raw HDF5 layout (docs/data.md) or as a LeRobot v3 dataset (see
    ``rayrm.data.synthetic``)."""

    # "hdf5" (the raw episode layout) or "lerobot" (a LeRobot v3 dataset folder, mp4 videos)
    format: str = "hdf5"
    # HDF5 file, or LeRobot dataset folder; default <workdir>/raw/episodes.h5 or raw/lerobot
    output: str | None = None
    fps: int = 10  # LeRobot only: frames per second of the videos
    num_episodes: int = 80
    failure_fraction: float = 0.3  # share of episodes that fail
    # Failure modes the failures cycle through; empty = stall, drop, backward (the easy ones).
    # The hard ones: wrong_target (carried fluently onto the tray, not into the pot) and
    # stop_short (set down on the table just before the pot); both need `distractor`.
    failure_modes: list[str] = field(default_factory=list)
    distractor: bool = False  # a tray on the table between cube and pot, in every episode
    image_size: int = 64  # square side_cam / wrist_cam frames
    min_stage_frames: int = 8
    max_stage_frames: int = 20
    noise: float = 4.0  # std of per-pixel Gaussian noise (uint8 units)
    prompt: str = "Put the cube in the pot."
    # Several tasks: cube colours (rayrm.data.synthetic.CUBE_COLORS), one task each with the
    # prompt "Put the <colour> cube in the pot."; empty = one task with `prompt`
    tasks: list[str] = field(default_factory=list)
    # Where the cube should go: ["pot"] (default), or ["pot", "tray"] (needs `distractor`):
    # every task then comes in both destinations, "... in the pot." / "... on the tray.", and a
    # wrong-target failure of one looks exactly like a success of the other
    destinations: list[str] = field(default_factory=lambda: ["pot"])
    seed: int = 0

    def validate(self) -> None:
        """What can be checked without the generator's palette (``rayrm.data.synthetic``
        checks the task colours)."""
        all_modes = (*SYNTH_FAILURE_MODES, *SYNTH_HARD_FAILURE_MODES)
        checks = [
            ("num_episodes", self.num_episodes >= 1, ">= 1"),
            ("image_size", self.image_size >= 16, ">= 16"),
            ("failure_fraction", 0.0 <= self.failure_fraction <= 1.0, "in [0, 1]"),
            ("min_stage_frames", self.min_stage_frames >= 2, ">= 2"),
            (
                "max_stage_frames",
                self.max_stage_frames >= self.min_stage_frames,
                ">= min_stage_frames",
            ),
            ("noise", self.noise >= 0.0, ">= 0"),
            ("tasks", len(set(self.tasks)) == len(self.tasks), "distinct"),
            (
                "destinations",
                bool(self.destinations)
                and all(d in SYNTH_DESTINATIONS for d in self.destinations)
                and len(set(self.destinations)) == len(self.destinations),
                f"distinct, of {list(SYNTH_DESTINATIONS)}",
            ),
            (
                "destinations",
                self.distractor or "tray" not in self.destinations,
                "without tray unless synth.distractor (the tray is the distractor)",
            ),
            ("format", self.format in SYNTH_FORMATS, f"one of {list(SYNTH_FORMATS)}"),
            ("fps", self.fps >= 1, ">= 1"),
            ("failure_modes", all(m in all_modes for m in self.failure_modes), f"of {all_modes}"),
            (
                "failure_modes",
                self.distractor or not set(self.failure_modes) & set(SYNTH_HARD_FAILURE_MODES),
                "easy ones unless synth.distractor (the hard ones need the tray)",
            ),
            # LeRobot's videos are yuv420p, which needs even frame sizes
            (
                "image_size",
                self.format != "lerobot" or self.image_size % 2 == 0,
                "even for lerobot",
            ),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"synth.{name} must be {rule}, got {getattr(self, name)!r}")


@dataclass
class BackboneConfig:
    """Which frame/prompt encoder to run; see ``rayrm.backbones`` for the registry."""

    name: str = "tiny"
    seed: int = 0  # random-init backbones (tiny) are deterministic from this seed
    visual_dim: int = 128  # tiny only; real backbones declare their own
    language_dim: int = 32  # tiny only
    checkpoint: str | None = None  # weights file or folder for real backbones
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or float32 / bfloat16
    options: dict[str, Any] = field(default_factory=dict)  # backbone-specific settings

    def validate(self) -> None:
        _choice("backbone.dtype", self.dtype, BACKBONE_DTYPES)
        _at_least("backbone.visual_dim", self.visual_dim, 1)
        _at_least("backbone.language_dim", self.language_dim, 1)


@dataclass
class EmbedConfig:
    """Ray Data embedding: HDF5 episodes or a LeRobot v3 dataset in, Parquet episode shards
    out (``rayrm.embed``)."""

    # HDF5 file, folder of .h5/.hdf5 files, or glob; or a LeRobot v3 dataset root (a folder
    # with meta/info.json); path or URL
    input: str | None = None
    output: str | None = None  # folder; default <workdir>/embeddings
    camera: str = "side_cam"  # HDF5 dataset, or LeRobot v3 video key (observation.images.top)
    # Several cameras of each episode (HDF5 datasets or LeRobot video keys), all embedded
    # and stored per frame, fused by the model; the first is the main one. Empty = `camera`.
    cameras: list[str] = field(default_factory=list)
    # LeRobot v3 only: each camera of `cameras` an episode of its own (episode_000007:<key>)
    # instead of views of one episode
    camera_as_episode: bool = False
    # HDF5 only: a per-frame robot state dataset (tcp_pose, float [T, P]) stored beside the
    # embeddings and fed to the model through its own projection; None = no state
    state: str | None = None
    # LeRobot v3 only: a bool column of meta/episodes/ holding each episode's success
    success_column: str | None = None
    prompt: str | None = None  # overrides per-episode / per-file prompt attributes
    batch_size: int = 64  # frames per backbone call
    frames_per_block: int = 64  # frames per Ray Data block read from HDF5
    num_actors: int = 1  # embedding actor pool size; 0 = one per GPU in the cluster
    max_actors: int = 0  # > num_actors: the pool autoscales between the two
    num_gpus_per_actor: float = 0.0
    # GPU actors reserve no CPU: Ray Data hangs when actors hold every CPU (ray#44687).
    num_cpus_per_actor: float = 0.0
    # Backbone calls in flight per actor: on a GPU, several let one batch's copies and host
    # work overlap another's compute (backbones that are not thread-safe still run one at a
    # time). 0 = 3 for GPU actors, 1 for CPU actors (more would only split the same cores).
    calls_per_actor: int = 0
    overwrite: bool = False  # replace a finished output (an unfinished one always resumes)
    max_failed_episodes: int = 0  # bad episodes tolerated before exiting non-zero; -1 = any
    max_actor_restarts: int = 4  # per actor, and retries per batch; -1 = unlimited
    torch_threads: int = 0  # intra-op threads per actor; 0 = what Ray sets (its CPU share)
    progress_every_s: float = 30.0  # seconds between progress log lines

    def views(self) -> list[str]:
        """The cameras fused into each frame vector, in order (one unless ``cameras``)."""
        return [self.camera] if self.camera_as_episode else list(self.cameras) or [self.camera]

    def validate(self) -> None:
        if len(set(self.cameras)) != len(self.cameras):
            raise ConfigError(f"embed.cameras names a camera twice: {self.cameras}")
        if self.camera_as_episode and not self.cameras:
            raise ConfigError("embed.camera_as_episode needs the cameras in embed.cameras")
        if self.camera_as_episode and self.state:
            raise ConfigError("embed.state needs one episode per recording, not camera_as_episode")
        for name in ("batch_size", "frames_per_block"):
            _at_least(f"embed.{name}", getattr(self, name), 1)
        for name in (
            "num_actors",
            "max_actors",
            "num_gpus_per_actor",
            "num_cpus_per_actor",
            "calls_per_actor",
            "torch_threads",
        ):
            _at_least(f"embed.{name}", getattr(self, name), 0)
        for name in ("max_failed_episodes", "max_actor_restarts"):  # -1 = unlimited
            _at_least(f"embed.{name}", getattr(self, name), -1)
        _above("embed.progress_every_s", self.progress_every_s, 0)


@dataclass
class ModelConfig:
    """Reward transformer (docs/recipe.md#model). Defaults are the reference sizes."""

    d_model: int = 512
    num_layers: int = 4
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    head_hidden: int = 256
    max_seq_len: int = 32  # L: window length seen by the model
    # "first": a learned vector on the first video token only (the reference); "all": a learned
    # position embedding for every video position.
    positional: str = "first"
    num_stages: int = 0  # 0: continuous ReWiND progress; K > 0: SARM stage + subtask heads
    # A per-frame success head (logit: "the task is done at this frame"), trained on
    # successes and failures alike (train.success_weight); checkpoints from before it have none.
    success_head: bool = True

    def validate(self) -> None:
        _choice("model.positional", self.positional, ("first", "all"))
        for name in ("d_model", "num_layers", "num_heads", "ffn_dim", "head_hidden", "max_seq_len"):
            _at_least(f"model.{name}", getattr(self, name), 1)
        _at_least("model.num_stages", self.num_stages, 0)
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be a multiple of model.num_heads "
                f"({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    """Ray Train (TorchTrainer + DDP) on the Parquet shards (``rayrm.train``)."""

    embeddings: str | None = None  # default <workdir>/embeddings
    output: str | None = None  # run folder; default <workdir>/train
    run_name: str = "reward_model"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # When the cluster lacks the workers' CPUs/GPUs: 0 fails at once (a fixed cluster);
    # > 0 asks the autoscaler for them and waits up to this many seconds (cluster configs).
    wait_for_resources_s: float = 0.0
    torch_threads: int = 0  # 0 = leave torch's default
    batch_size: int = 256  # global batch, split evenly over workers
    epochs: int = 100  # an epoch = as many windows as training frames (docs/recipe.md#windows)
    steps: int = 0  # > 0 overrides epochs with a fixed step count
    lr: float = 1e-4
    lr_min: float = 1e-5  # cosine decay floor
    warmup_steps: int = 0  # linear warmup from lr/100 before the cosine decay
    weight_decay: float = 1e-4  # AdamW (decoupled)
    grad_clip: float = 1.0
    compile: bool = False  # torch.compile the training model (GPU: faster steps after warm-up)
    # ReWiND's mismatched-instruction negatives: with this probability a window gets another
    # task's instruction and a target of 0 everywhere (needs >= 2 distinct prompts).
    mismatch_prob: float = 0.0
    # SARM: share of windows whose subtask head is conditioned on the ground-truth stage
    # (the predicted stage conditions the rest, as at inference).
    gt_stage_prob: float = 0.75
    stage_prior: str = "episode"  # episode: mean per-episode stage share (SARM); frame: pooled
    rewind: bool = True
    rewind_prob: float = 0.8
    val_ratio: float = 0.2  # held-out episodes, by episode
    val_every: int = 0  # steps between validations; 0 = every 10 epochs (the reference's)
    val_windows: int = 512  # fixed windows drawn from held-out episodes for val loss
    # Failed episodes (success false) train the success head and the ranking loss, never the
    # progress targets (those assume success). true: drop them (the success-only ablation).
    only_successful: bool = False
    # Success head: binary cross-entropy per frame; a successful episode's frames from this
    # share of the episode on are labelled "done", every failed episode's frame "not done".
    success_weight: float = 1.0
    success_from: float = 0.9
    # Ranking loss between trajectories of one task (Robometer's preference supervision): at
    # the same relative time tau, a success's prefix must score above a failure's prefix,
    # -log sigmoid(rank_scale * (p_success - p_failure)), weighted by tau. Needs failures.
    rank_weight: float = 1.0
    # (success, failure) pairs per step, global. null: in proportion to the failures, the
    # batch size times their share of the training frames (at least 1), so a few failures
    # are not drawn over and over; 0: none (failures' windows then train the success head)
    rank_pairs: int | None = None
    rank_scale: float = 10.0
    rank_min_tau: float = 0.2  # taus drawn in [rank_min_tau, 1]: early prefixes look alike
    blind: bool = False  # zero every input feature: the blind control
    seed: int = 0
    num_to_keep: int = 1  # best checkpoints by val_loss kept besides the latest; 0 keeps all
    max_failures: int = 3  # worker failures survived by restarting from the latest checkpoint
    loggers: list[str] = field(default_factory=list)  # any of tensorboard, wandb, mlflow
    crash_at_step: int = 0  # fault-tolerance drill: rank 0 exits once at this step

    def validate(self) -> None:
        _choice("train.stage_prior", self.stage_prior, ("episode", "frame"))
        for name in ("num_workers", "batch_size", "epochs", "val_windows"):
            _at_least(f"train.{name}", getattr(self, name), 1)
        for name in (
            "steps",
            "val_every",
            "warmup_steps",
            "lr_min",
            "weight_decay",
            "torch_threads",
        ):
            _at_least(f"train.{name}", getattr(self, name), 0)
        for name in ("lr", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError(f"train.val_ratio must be in [0, 1), got {self.val_ratio}")
        for name in ("success_weight", "rank_weight", "mismatch_prob", "rank_scale"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("success_from", "rank_min_tau", "gt_stage_prob", "rewind_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.rank_pairs is not None and self.rank_pairs < 0:
            raise ConfigError(f"train.rank_pairs must be >= 0, got {self.rank_pairs}")
        _above("train.cpus_per_worker", self.cpus_per_worker, 0)
        for name in ("wait_for_resources_s", "num_to_keep", "crash_at_step"):
            _at_least(f"train.{name}", getattr(self, name), 0)
        _at_least("train.max_failures", self.max_failures, -1)  # -1 = unlimited (Ray Train)
        for i, name in enumerate(self.loggers):
            _choice(f"train.loggers[{i}]", name, TRAIN_LOGGERS)


@dataclass
class AnnotateConfig:
    """Stage labels on embedding shards, and videos to read them off (``rayrm.annotate``)."""

    stages: str | None = None  # stage JSON; default stages.json beside synth.output
    embeddings: str | None = None  # shards labelled in place; default <workdir>/embeddings
    num_stages: int = 0  # K; 0 = from the JSON (its stage names, else its boundary counts)
    stage_names: list[str] = field(default_factory=list)  # names for the plain JSON form
    # Episodes the JSON leaves out (failures often can't be fully labelled) are an error,
    # unless allowed: they then get empty stage / subtask_progress lists.
    allow_unannotated: bool = False
    input: str | None = None  # annotate-video: raw HDF5 or a LeRobot v3 root; default embed.input
    camera: str = "side_cam"
    video_output: str | None = None  # annotate-video: default <workdir>/annotate
    episodes: list[str] = field(default_factory=list)  # annotate-video: subset (default all)
    fps: int = 10
    min_size: int = 256  # small frames are upscaled (nearest) so numbers stay readable
    contact_every: int = 5  # contact sheet: every n-th frame
    contact_columns: int = 8

    def validate(self) -> None:
        _at_least("annotate.num_stages", self.num_stages, 0)
        for name in ("fps", "min_size", "contact_every", "contact_columns"):
            _at_least(f"annotate.{name}", getattr(self, name), 1)


@dataclass
class EvaluateConfig:
    """Whole-episode reward curves and metrics (``rayrm.evaluate``)."""

    embeddings: str | None = None  # default <workdir>/embeddings
    checkpoint: str | None = None  # default: best checkpoint of <workdir>/train
    output: str | None = None  # default <workdir>/eval
    split: str = "val"  # val = held-out episodes of the checkpoint's split; or all
    plot_episodes: int = 3  # expert and failure episodes drawn in the plot
    batch_size: int = 256  # prefixes per forward pass
    # Raw HDF5 episodes (file, folder or glob) embedded on the fly through the checkpoint's
    # backbone instead of reading shards; with it, split "val" keeps only held-out ids.
    input: str | None = None
    camera: str | None = None  # raw input and videos; default the embedding's camera
    prompt: str | None = None  # raw input: overrides the episodes' prompt attributes
    blind_checkpoint: str | None = None  # a blind control scored beside the model
    # the same model trained on successes only (train.only_successful), scored beside it
    success_only_checkpoint: str | None = None
    # Reward-hacking flag: prefix progress reaching hacking_progress while the success head's
    # final "done" probability stays below hacking_success
    hacking_progress: float = 0.9
    hacking_success: float = 0.5

    rewind: bool = True  # also score rewound copies of the expert episodes
    rewind_turn: float = 0.75  # play forward up to this share of the episode...
    rewind_back: float = 0.5  # ...then back over this share of the frames played
    episode_figures: int = 24  # per-episode PNGs (-1 = all)
    videos: int = 6  # per-episode mp4s, frame beside the growing curve (-1 = all)
    fps: int = 10
    report: bool = True  # the self-contained report.html
    embed_videos_mb: float = 25.0  # embed videos in the report up to this total, else link

    def validate(self) -> None:
        _choice("evaluate.split", self.split, ("val", "all"))
        _at_least("evaluate.plot_episodes", self.plot_episodes, 0)
        for name in ("batch_size", "fps"):
            _at_least(f"evaluate.{name}", getattr(self, name), 1)
        for name in ("episode_figures", "videos"):  # -1 = all
            _at_least(f"evaluate.{name}", getattr(self, name), -1)
        _at_least("evaluate.embed_videos_mb", self.embed_videos_mb, 0)
        for name in ("hacking_progress", "hacking_success", "rewind_turn", "rewind_back"):
            _within(f"evaluate.{name}", getattr(self, name), 0.0, 1.0)


@dataclass
class ScoreConfig:
    """Per-frame rewards of a whole dataset (``rayrm score``; layout in ``rayrm.data.schema``)."""

    checkpoint: str | None = None  # default: best checkpoint of <workdir>/train
    # Raw episodes (HDF5, or a LeRobot v3 root: its index / episode_index are used) embedded
    # on the fly; empty = the embeddings (``embeddings``)
    input: str | None = None
    embeddings: str | None = None  # default embed.output
    # Scoring the embeddings of a LeRobot v3 dataset: its root, for index / episode_index
    dataset: str | None = None
    # Raw input: the camera (HDF5 dataset or LeRobot key, e.g. observation.images.top);
    # default evaluate.camera, else the camera of the checkpoint's embeddings
    camera: str | None = None
    # A folder: rewards.parquet (LeRobot's progress_path) and its manifest; default
    # <workdir>/score. A rerun on an unfinished one resumes it.
    output: str | None = None
    rabc_chunk: int = 0  # > 0: RA-BC weights, progress delta over this many frames
    rabc_kappa: float = 0.01  # RA-BC hard threshold (LeRobot's default)
    batch_size: int = 256  # prefixes per forward pass
    episodes_per_part: int = 16  # episodes per actor call, and per committed part file
    num_actors: int = 0  # scoring actors; 0 = one per GPU left by embedding (one on CPU)
    num_gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    num_cpus_per_actor: float = 0.0
    torch_threads: int = 0  # intra-op threads per scoring actor; 0 = torch's default
    max_actor_restarts: int = 4  # per actor, and retries per call; -1 = unlimited
    progress_every_s: float = 30.0  # seconds between progress log lines
    overwrite: bool = False

    def validate(self) -> None:
        for name in ("batch_size", "episodes_per_part"):
            _at_least(f"score.{name}", getattr(self, name), 1)
        for name in ("rabc_chunk", "rabc_kappa", "num_actors", "num_cpus_per_actor"):
            _at_least(f"score.{name}", getattr(self, name), 0)
        _at_least("score.torch_threads", self.torch_threads, 0)
        if self.num_gpus_per_actor is not None:
            _at_least("score.num_gpus_per_actor", self.num_gpus_per_actor, 0)
        _at_least("score.max_actor_restarts", self.max_actor_restarts, -1)  # -1 = unlimited
        _above("score.progress_every_s", self.progress_every_s, 0)


@dataclass
class ServeConfig:
    """Online rewards over HTTP and Ray Serve handles (``rayrm serve``, ``rayrm.serve``)."""

    checkpoint: str | None = None  # default: best checkpoint of <workdir>/train
    app_name: str = "rayrm"
    host: str = "127.0.0.1"  # HTTP bind address; 0.0.0.0 exposes it beyond this machine
    port: int = 8000
    route_prefix: str = "/"
    replicas: int = 1  # model replicas; with max_replicas > replicas, the autoscaling minimum
    max_replicas: int = 0  # 0: a fixed number of replicas; else autoscale up to this many
    target_ongoing_requests: float = 32.0  # autoscaling target per replica
    downscale_delay_s: float = 600.0  # autoscaling: low load this long before a replica goes
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    http_replicas: int = 1  # stateless HTTP front replicas (parse, check, forward)
    max_batch_size: int = 64  # steps of different streams fused into one model call
    batch_wait_s: float = 0.002  # how long a batch waits to fill before it runs
    max_ongoing_requests: int = 512  # per model replica; above max_batch_size so batches fill
    max_streams: int = 4096  # open streams per replica; more are refused (503)
    stream_idle_s: float = 900.0  # a stream unused this long is closed to free its memory
    max_body_mb: float = 16.0  # larger HTTP bodies are refused (413)
    max_frame_side: int = 2048  # frames larger than this on a side are refused (400)
    detach: bool = False  # rayrm serve returns once deployed, leaving the app running

    def validate(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"serve.replicas must be >= 1, got {self.replicas}")
        if self.max_replicas and self.max_replicas < self.replicas:
            raise ConfigError(
                f"serve.max_replicas ({self.max_replicas}) must be 0 or >= serve.replicas "
                f"({self.replicas})"
            )
        for name in ("max_batch_size", "max_ongoing_requests", "max_streams", "http_replicas"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_wait_s", "stream_idle_s", "max_body_mb", "cpus_per_replica"):
            if getattr(self, name) < 0:
                raise ConfigError(f"serve.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"serve.port must be in 1..65535, got {self.port}")
        _above("serve.target_ongoing_requests", self.target_ongoing_requests, 0)
        _at_least("serve.downscale_delay_s", self.downscale_delay_s, 0)
        _at_least("serve.max_frame_side", self.max_frame_side, 1)
        if self.gpus_per_replica is not None:
            _at_least("serve.gpus_per_replica", self.gpus_per_replica, 0)


@dataclass
class GvlConfig:
    """Zero-shot progress (``rayrm gvl``, ``rayrm.zeroshot.gvl``): Qwen3-VL shown one successful
    episode in context, asked for the progress of other episodes' frames (GVL)."""

    checkpoint: str | None = None  # local Qwen3-VL model folder (required)
    input: str | None = None  # HDF5 file in the raw episode layout; default embed.input
    reference: str | None = None  # episode id of a successful demonstration (required)
    episodes: list[str] = field(default_factory=list)  # episodes asked about; empty = all others
    camera: str = "side_cam"
    num_reference: int = 8  # reference frames shown, evenly spaced over the episode
    num_target: int = 16  # frames asked about per episode, evenly spaced
    prompt: str | None = None  # task text; default the episode's (or file's) prompt attribute
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU; or float32 / bfloat16
    max_new_tokens: int = 0  # answer budget; 0 = 64 + 8 per target frame
    # Image processor bounds (min_pixels / max_pixels; default the model folder's)
    options: dict[str, Any] = field(default_factory=dict)
    output: str | None = None  # JSON file of the results; empty = printed to stdout

    def validate(self) -> None:
        _at_least("gvl.num_reference", self.num_reference, 1)
        _at_least("gvl.num_target", self.num_target, 1)
        _at_least("gvl.max_new_tokens", self.max_new_tokens, 0)


@dataclass
class RayConfig:
    address: str | None = None  # None: connect to a running cluster or start a local one
    num_cpus: int | None = None  # only for a local Ray started by rayrm

    def validate(self) -> None:
        if self.num_cpus is not None:
            _at_least("ray.num_cpus", self.num_cpus, 1)


@dataclass
class Config:
    workdir: str = "outputs/demo"
    synth: SynthConfig = field(default_factory=SynthConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    gvl: GvlConfig = field(default_factory=GvlConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    log_level: str = "INFO"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation, converting ints to floats where allowed."""
    if isinstance(value, _Override):
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        options = typing.get_args(annotation) if union else (annotation,)
        if str in options and not (type(None) in options and value.raw.strip() in _NULLS):
            return value.raw
        value = value.value()
    value = _plain(value)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {annotation}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if isinstance(value, str):  # --train.loggers tensorboard
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation in (int, float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got {value!r}")
    return value


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, _Override):  # e.g. --train 5
                value = value.value()
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping, got {value!r}")
            _apply(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "3e-4", "--model.num_layers=2"]`` -> nested dict of typed values."""
    return _plain(_parse_override_args(args))


def _parse_override_args(args: list[str]) -> dict[str, Any]:
    """Like :func:`parse_overrides`, with each value kept as written (:class:`_Override`)."""
    nested: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --section.key value, got {arg!r}")
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            raw = args[i + 1]
            i += 1
        i += 1
        node = nested
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg}: '{part}' was already given a value")
        node[parts[-1]] = _Override(raw, key)
    return nested


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def _above(name: str, value: float, low: float) -> None:
    if value <= low:
        raise ConfigError(f"{name} must be > {low}, got {value}")


def _within(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then the overrides."""
    cfg = Config()
    if path is not None:
        with open(path) as f:
            data = _load_yaml(f, str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        try:
            _apply(cfg, data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    if overrides:
        _apply(cfg, _parse_override_args(overrides))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Each section's own checks (a ``validate()`` method), run when the config is built."""
    _choice("log_level", cfg.log_level.upper(), LOG_LEVELS)
    for section in dataclasses.fields(cfg):
        check = getattr(getattr(cfg, section.name), "validate", None)
        if callable(check):
            check()


def _beside(path: str, name: str) -> str:
    """``name`` in the folder of ``path`` (a local path or a URL)."""
    if "://" in path:
        return f"{path.rstrip('/').rsplit('/', 1)[0]}/{name}"
    return str(Path(path).with_name(name))


def resolve_paths(cfg: Config) -> Config:
    """Fill empty stage paths from ``workdir`` so the stages find each other's outputs."""
    out = dataclasses.replace(cfg)
    work = cfg.workdir.rstrip("/")
    default_raw = "raw/lerobot" if cfg.synth.format == "lerobot" else "raw/episodes.h5"
    out.synth = dataclasses.replace(cfg.synth, output=cfg.synth.output or f"{work}/{default_raw}")
    out.embed = dataclasses.replace(
        cfg.embed,
        input=cfg.embed.input or out.synth.output,
        output=cfg.embed.output or f"{work}/embeddings",
    )
    out.train = dataclasses.replace(
        cfg.train,
        embeddings=cfg.train.embeddings or out.embed.output,
        output=cfg.train.output or f"{work}/train",
    )
    out.evaluate = dataclasses.replace(
        cfg.evaluate,
        embeddings=cfg.evaluate.embeddings or out.embed.output,
        output=cfg.evaluate.output or f"{work}/eval",
    )
    out.score = dataclasses.replace(
        cfg.score,
        embeddings=cfg.score.embeddings or out.embed.output,
        output=cfg.score.output or f"{work}/score",
    )
    out.annotate = dataclasses.replace(
        cfg.annotate,
        # rayrm synth writes the stage JSON of its successful episodes beside the HDF5 file.
        stages=cfg.annotate.stages or _beside(out.synth.output, "stages.json"),
        embeddings=cfg.annotate.embeddings or out.embed.output,
        input=cfg.annotate.input or out.embed.input,
        video_output=cfg.annotate.video_output or f"{work}/annotate",
    )
    out.gvl = dataclasses.replace(cfg.gvl, input=cfg.gvl.input or out.embed.input)
    return out


def settings_diff(old: dict, new: dict) -> str:
    """What differs between two settings dicts, as ``key: old -> new; ...`` (resume checks)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass (e.g. stored in a checkpoint's JSON) with type checks."""
    obj = cls()
    _apply(obj, data)
    return obj


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
