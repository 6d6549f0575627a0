"""The data layouts rayrm reads and writes, written down once.

Raw episodes (input)
--------------------
One HDF5 file holds many episodes; each top-level group is one episode and its name is the
episode id. Episode ids must be unique across all input files.

=================  ================  ==================================================
dataset            dtype / shape     meaning
=================  ================  ==================================================
``side_cam``       uint8 [T,H,W,3]   camera the reward model sees (``embed.camera``)
``wrist_cam``      uint8 [T,H,W,3]   second camera (``embed.cameras: [side_cam, wrist_cam]``)
``tcp_pose``       float [T,P]       end-effector pose (``embed.state: tcp_pose``)
``action``         float [T,A]       actions; T = len(action) when present
=================  ================  ==================================================

Optional attributes of an episode group (the synthetic generator writes all of them):
``prompt`` (str; else the file's ``prompt`` attribute; ``embed.prompt`` overrides both),
``success`` (bool), ``stage_boundaries`` (int [K-1], first frame of stages 2..K),
``num_stages`` (int), ``failure_mode`` (str).

LeRobot v3 datasets (input; ``rayrm.data.lerobot`` reads them, ``rayrm.data.lerobot_writer``
writes them for tests and ``rayrm synth``)
----------------------------------------------------------------------------------------------
The layout of LeRobot's ``codebase_version`` "v3.0" (``src/lerobot/datasets/utils.py``:
``INFO_PATH``, ``DEFAULT_TASKS_PATH``, ``DEFAULT_EPISODES_PATH``, ``DEFAULT_DATA_PATH``,
``DEFAULT_VIDEO_PATH``; ``dataset_metadata.py``: ``CODEBASE_VERSION``)::

    meta/info.json                                   codebase_version, fps, features, paths
    meta/tasks.parquet                               one row per task: ``task_index`` and the
                                                     task string (the pandas index ``task``)
    meta/episodes/chunk-000/file-000.parquet         one row per episode (columns below)
    data/chunk-000/file-000.parquet                  one row per frame: index, episode_index,
                                                     frame_index, timestamp, task_index, ...
    videos/<camera key>/chunk-000/file-000.mp4       one stream per camera; several episodes
                                                     one after another in each file

``info.json`` names the templates (``data_path``, ``video_path``, with ``chunk_index``,
``file_index`` and ``video_key``) and ``chunks_size`` (files per chunk folder). A camera is
a feature of ``dtype`` "video" with ``shape`` [H, W, 3].

Episode rows that rayrm reads (``meta/episodes/``; LeRobot's ``stats/...`` columns ignored):

====================================  ===========  ============================================
column                                type         meaning
====================================  ===========  ============================================
``episode_index``                     int64        the episode's number
``length``                            int64        T, frames in the episode
``tasks``                             list<str>    its task strings (rayrm uses the first)
``dataset_from_index``                int64        global ``index`` of its first frame
``dataset_to_index``                  int64        one past the global index of its last frame
``videos/<key>/chunk_index``          int64        where its frames are: the file of
``videos/<key>/file_index``           int64        ``video_path`` with these numbers, from
``videos/<key>/from_timestamp``       float64      this time (s) to this one; frame t is at
``videos/<key>/to_timestamp``         float64      ``from_timestamp + t / fps``
(``embed.success_column``)            bool         optional success flag (not LeRobot's own)
====================================  ===========  ============================================

rayrm names a LeRobot episode ``episode_<episode_index, 6 digits>``; with several cameras
(``embed.cameras``) the episode holds every camera's view (one frame vector per timestep,
see "Several cameras and the robot state" below); only with ``embed.camera_as_episode`` is
each camera's view an episode of its own, ``episode_000007:<key>``.

Per-frame rewards (output of ``rayrm score``)
---------------------------------------------
A folder (``score.output``, local path or URL), committed like the embedding shards: a
manifest written last is the commit record, and no step needs a rename::

    rewards.parquet                   every frame of every scored episode, once, sorted by
                                      ``index`` (:data:`SCORE_SCHEMA`): the file to hand to
                                      LeRobot (:data:`SCORE_FILE`)
    manifest.json                     the commit record: format, run id, the file, episodes,
                                      frames, checkpoint, dataset (:data:`MANIFEST_NAME`)
    _run/run.json                     an unfinished run: the settings that decide the rewards
                                      and the run id (:data:`SCORE_RUN_FILE`)
    _run/parts/<run>-<unique>.parquet whole episodes' frames (:data:`SCORE_PART_SCHEMA`), each
                                      file written whole by one scoring actor call

The part files are the resumable state: a rerun of the same run id reads back which episodes
they hold and scores only the others; an episode found in two parts (a retried call) is taken
from one of them. The commit step reads the parts, computes the RA-BC weights (they need the
mean and std of the deltas over the whole dataset), writes ``rewards.parquet``, then the
manifest, then removes ``_run/``. One file rather than the parts: LeRobot's ``RABCWeights``
reads ``progress_path`` with ``pd.read_parquet`` and downloads ``hf://`` paths as one file
(``src/lerobot/rewards/sarm/rabc.py``).

The first four columns are the ones LeRobot's SARM writes
(``src/lerobot/rewards/sarm/compute_rabc_weights.py``) and its ``RABCWeights`` reads
(``sample_weighting.progress_path``, ``head_mode: sparse``).

Sparse and dense: a LeRobot SARM model has a sparse head (a few high-level stages, or one
"task" stage) and, in its ``dense_only`` and ``dual`` modes, a dense head over fine-grained
subtasks; each head's total progress (stage + tau, normalised) is one column. rayrm's
models have one progress output (SARM: one set of K stages, whose total progress is
``cumulative_prior[stage] + prior[stage] * subtask``), the sparse head's kind, so rayrm
writes ``progress_sparse`` and no ``progress_dense``: ``head_mode: dense`` then fails in
LeRobot with its "column not found" error instead of training on made-up values.

=======================  ===========  ===================================================
column                   type         meaning
=======================  ===========  ===================================================
``index``                int64        global frame index: LeRobot's ``dataset_from_index
                                      + frame_index``; HDF5 input: frames counted over the
                                      episodes in id order
``episode_index``        int64        LeRobot's episode_index; HDF5: position in id order
``frame_index``          int64        t in 0..T-1
``progress_sparse``      float32      the causal reward at t: what ``RewardScorer`` gives an
                                      RL loop after frames 0..t
``episode_id``           string       rayrm's episode id
``prefix``               float32      the plain prefix value (``rayrm evaluate``'s prefix
                                      curve); equals the causal reward to float precision
``stage``                int32        SARM models: the stage the causal reward was read in
                                      (argmax of the stage head); null otherwise
``subtask_progress``     float32      SARM models: the subtask progress head at t, within
                                      ``stage`` (from the prefix pass); null otherwise
``success``              float32      models with a success head: its probability that the
                                      task is done at t (prefix pass); null otherwise
``rabc_delta``           float32      with ``score.rabc_chunk``: progress[t+N] - progress[t]
``rabc_weight``          float32      with ``score.rabc_chunk``: the RA-BC weight (SARM Eq.
                                      8-9, ``rayrm.score.rabc``); null without
=======================  ===========  ===================================================

The part files hold the same columns without the two ``rabc_`` ones. ``rewards.parquet``'s
metadata holds ``reward_model_path`` (the checkpoint, the key LeRobot reads) and
``rayrm.score`` (JSON: checkpoint, dataset, rayrm version, the score config).

Embedding shards (output of ``rayrm embed``, input of annotate, train and evaluate)
-----------------------------------------------------------------------------------
A folder (local path or URL) whose ``manifest.json`` is the commit record: it is written
last, and it names every file that belongs to the result. Readers open the manifest and the
files it names, nothing else; a file it does not name (a crashed run's, an older version's
before clean-up) is ignored. No file is ever changed once written, and every name is unique,
so no step needs a rename (object stores have none)::

    manifest.json                  the commit record (:data:`MANIFEST_NAME`)
    episodes-<id>.parquet          one row per episode: metadata, language vector, where its
                                   frame embeddings are (:data:`EPISODE_INDEX_SCHEMA`)
    chunks/<run>-<task>.parquet    frame embeddings, one row per chunk (:data:`CHUNK_SCHEMA`)
    failures-<run>.json            episodes that could not be embedded
    _run/                          an unfinished run's own state; never read by readers

**A chunked episode.** An episode's frame embeddings are stored as one or more *chunks*: runs
of consecutive frames ``[frame_start, frame_start + num_frames)``, each one row of a chunk
file and **each row its own Parquet row group**, so a reader fetches exactly the chunks it
needs and no other episode's bytes. The episodes table lists an episode's chunks in frame
order (``chunk_file[i]``, ``chunk_row_group[i]``, ``chunk_start[i]``); they tile ``[0, T)``
exactly, each frame once. An episode is whole in one chunk unless it is longer than a read
block or straddles two blocks, so no episode ever has to fit in one block or one call.
Reading an episode = concatenating the ``visual_embedding`` values of its chunks in that order
(:class:`rayrm.data.shards.EpisodeReader`).

Chunk rows (:data:`CHUNK_SCHEMA`, in ``chunks/``):

=======================  ======================  ==========================================
column                   Arrow type              meaning
=======================  ======================  ==========================================
``episode_id``           string                  the episode the frames belong to
``frame_start``          int32                   first frame index of the chunk
``num_frames``           int32                   frames in the chunk (n)
``visual_embedding``     large_list<float32>     n * D values, row-major [n, D]; with
                                                 several cameras the first camera's (D_0)
``visual_embedding/<c>`` large_list<float32>     further cameras ``c``: n * D_c values
``state``                large_list<float32>     with ``embed.state``: n * P values
=======================  ======================  ==========================================

Episode rows (:data:`EPISODE_INDEX_SCHEMA`, the ``episodes-<id>.parquet`` table):

=======================  ======================  ==========================================
column                   Arrow type              meaning
=======================  ======================  ==========================================
``episode_id``           string                  HDF5 group name
``source_file``          string                  HDF5 file it came from (path or URL)
``num_frames``           int32                   T
``prompt``               string                  task instruction used for the embedding
``success``              bool (nullable)         episode attribute, null when unknown
``stage_boundaries``     list<int32>             ground-truth stage starts (may be empty)
``language_embedding``   list<float32>           [D_lang], empty for backbones without one
``failure_mode``         string (nullable)       episode attribute (why it failed), null when
                                                 unknown; absent in folders made before it
``chunk_file``           list<string>            chunk files, relative to the folder
``chunk_row_group``      list<int32>             row group of each chunk in its file
``chunk_start``          list<int32>             first frame of each chunk (increasing)
=======================  ======================  ==========================================

Readers hand out whole episodes (:data:`EPISODE_SCHEMA`): the episode columns above without
the chunk locations, plus ``visual_embedding`` (large_list<float32>, T * D values, row-major
[T, D]) assembled from the chunks. ``D`` and ``D_lang`` are stored in the manifest
(``visual_dim``, ``language_dim``; with several cameras or a state, ``D`` is the frame
vector's ``FrameLayout.dim``, see below); the progress label (t + 1) / T follows from T.

**Several cameras and the robot state** (``embed.cameras``, ``embed.state``). The first
camera's embeddings are ``visual_embedding``, as with one camera (so a single-camera folder is
the one-view case of this layout, read unchanged); each further camera gets a column of its
own, :func:`view_column` ``visual_embedding/<camera>``, and the per-frame robot state (e.g.
``tcp_pose``, [T, P] floats) the column :data:`STATE_COLUMN` ``state``. These columns are in
the chunk rows (same type and row-major layout as ``visual_embedding``; D_v or P values per
frame). The manifest's ``frame_layout`` (:class:`FrameLayout`) records the cameras in order,
each one's dim and the state key and dim; a folder without it has one view, ``camera`` with
``visual_dim`` values, and no state. The checkpoint's ``config.json`` holds the same
``frame_layout`` (and the model's ``view_dims`` / ``state_dim``):

==============================  ==============  ==============================================
manifest key                    type            meaning
==============================  ==============  ==============================================
``camera``                      str             the first camera (stored as visual_embedding)
``frame_layout.cameras``        list<str>       every camera, in the frame vector's order
``frame_layout.view_dims``      list<int>       each camera's D_v (one backbone: all equal)
``frame_layout.state_key``      str or null     ``embed.state`` (e.g. ``tcp_pose``)
``frame_layout.state_dim``      int             P; 0 without a state
``camera_as_episode``           bool            LeRobot: each camera an episode of its own
==============================  ==============  ==============================================

Readers hand out one frame vector per timestep: ``visual_embedding`` of a whole-episode row
(and ``EpisodeBatch.visual``) is the concatenation ``[view_0 | view_1 | ... | state]`` in the
manifest's order, ``FrameLayout.dim`` values per frame. Window sampling and gathers then work
on one row per frame whatever the cameras; the model splits the vector again
(``rayrm.train.model``), knowing the layout from the checkpoint.

Stage labels (SARM), added by ``rayrm annotate`` to every episode row (empty lists for episodes
the stage JSON does not cover), in a new episodes table under a new manifest that names the
same chunk files; the manifest then also holds ``num_stages`` and ``stage_names``:

=======================  ======================  ==========================================
column                   Arrow type              meaning
=======================  ======================  ==========================================
``stage``                list<int32>             stage index k in 0..K-1 of every frame
``subtask_progress``     list<float32>           (t - s_k + 1) / (s_{k+1} - s_k)
=======================  ======================  ==========================================

``stage_boundaries`` then holds the annotated boundaries (first frames of stages 2..K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

CAMERA_KEYS = ("side_cam", "wrist_cam")
POSE_KEY = "tcp_pose"
ACTION_KEY = "action"
MIN_EPISODE_FRAMES = 4  # the window sampler needs a start in [0, T-4] (docs/recipe.md#windows)

ATTR_PROMPT = "prompt"
ATTR_SUCCESS = "success"
ATTR_STAGE_BOUNDARIES = "stage_boundaries"
ATTR_NUM_STAGES = "num_stages"
ATTR_FAILURE_MODE = "failure_mode"

# LeRobot v3 (see the module docstring)
LEROBOT_CODEBASE_VERSION = "v3.0"
LEROBOT_INFO_PATH = "meta/info.json"
LEROBOT_TASKS_PATH = "meta/tasks.parquet"
LEROBOT_EPISODES_DIR = "meta/episodes"
LEROBOT_CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
LEROBOT_EPISODES_PATH = LEROBOT_EPISODES_DIR + "/" + LEROBOT_CHUNK_FILE + ".parquet"
LEROBOT_DATA_PATH = "data/" + LEROBOT_CHUNK_FILE + ".parquet"
LEROBOT_VIDEO_PATH = "videos/{video_key}/" + LEROBOT_CHUNK_FILE + ".mp4"
LEROBOT_CHUNKS_SIZE = 1000  # LeRobot's DEFAULT_CHUNK_SIZE: files per chunk folder


def lerobot_video_column(camera: str, name: str) -> str:
    """``videos/<camera>/<name>``: chunk_index, file_index, from_timestamp, to_timestamp."""
    return f"videos/{camera}/{name}"


def lerobot_episode_id(episode_index: int, camera: str | None = None) -> str:
    """rayrm's id of a LeRobot episode; ``camera`` only when several cameras are read."""
    name = f"episode_{episode_index:06d}"
    return f"{name}:{camera}" if camera else name


# Several cameras and the robot state (see "Embedding shards" above)
FRAME_COLUMN = "frame"  # the first camera's uint8 frames in the embedding pipeline's blocks
VISUAL_COLUMN = "visual_embedding"  # the first camera's embeddings
STATE_COLUMN = "state"  # the robot state per frame, float32 [P], passed through unembedded


def safe_name(episode_id: str) -> str:
    """An episode id as a file name (HDF5 names may hold characters a path can't): the stem
    of every per-episode file (annotation videos, evaluation figures and videos)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in episode_id)


def frame_column(index: int, camera: str) -> str:
    """The pipeline column holding camera ``index``'s frames: ``frame``, ``frame/<camera>``."""
    return FRAME_COLUMN if index == 0 else f"{FRAME_COLUMN}/{camera}"


def view_column(index: int, camera: str) -> str:
    """The chunk column holding camera ``index``'s embeddings: ``visual_embedding`` for the
    first camera (a single-camera folder's only one), ``visual_embedding/<camera>`` after it.
    A ``/`` and not a ``.``: Parquet joins nested column paths with dots, and LeRobot camera
    keys hold dots already."""
    return VISUAL_COLUMN if index == 0 else f"{VISUAL_COLUMN}/{camera}"


def embedded_column(frame_col: str) -> str:
    """``frame/<camera>`` -> ``visual_embedding/<camera>`` (what the embedding actor writes)."""
    return VISUAL_COLUMN + frame_col[len(FRAME_COLUMN) :]


@dataclass(frozen=True)
class FrameLayout:
    """What one stored frame vector holds: each camera's embedding, then the state, in this
    order. ``rayrm embed`` writes it to the manifest (``frame_layout``); training copies it
    into the checkpoint, where the model and the raw-input paths read it back."""

    cameras: tuple[str, ...]
    view_dims: tuple[int, ...]
    state_key: str | None = None
    state_dim: int = 0

    @property
    def dim(self) -> int:
        """Values per frame: the width of ``visual_embedding`` as readers hand it out."""
        return sum(self.view_dims) + self.state_dim

    @property
    def single_camera(self) -> bool:
        """One view and no state: the layout of every folder made before several cameras."""
        return len(self.cameras) == 1 and self.state_dim == 0

    def columns(self) -> list[str]:
        """The chunk columns that make up the frame vector, in order."""
        views = [view_column(i, c) for i, c in enumerate(self.cameras)]
        return views + ([STATE_COLUMN] if self.state_dim else [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "cameras": list(self.cameras),
            "view_dims": list(self.view_dims),
            "state_key": self.state_key,
            "state_dim": self.state_dim,
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> FrameLayout:
        """The manifest's (or a checkpoint config's) ``frame_layout``; without one, the
        single-camera layout of older folders."""
        layout = manifest.get("frame_layout")
        if layout is None:
            camera = manifest.get("camera") or CAMERA_KEYS[0]
            return cls((camera,), (int(manifest["visual_dim"]),))
        return cls(
            tuple(layout["cameras"]),
            tuple(int(d) for d in layout["view_dims"]),
            layout.get("state_key"),
            int(layout.get("state_dim") or 0),
        )


def chunk_schema(extra_columns: list[str] = ()) -> pa.Schema:
    """:data:`CHUNK_SCHEMA` with the columns of further cameras and the state after it
    (``FrameLayout.columns()[1:]``), each of the same type as ``visual_embedding``."""
    extra = [pa.field(c, pa.large_list(pa.float32()), nullable=False) for c in extra_columns]
    return pa.schema(list(CHUNK_SCHEMA) + extra)


MANIFEST_NAME = "manifest.json"
CHUNKS_DIR = "chunks"
RUN_DIR = "_run"  # an unfinished embedding run's state: run.json, failures.json
EPISODES_PREFIX = "episodes-"
FAILURES_PREFIX = "failures-"
EMBEDDINGS_FORMAT = "rayrm.embeddings/2"

CHUNK_SCHEMA = pa.schema(
    [
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("frame_start", pa.int32(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("visual_embedding", pa.large_list(pa.float32()), nullable=False),
    ]
)

_EPISODE_FIELDS = [
    pa.field("episode_id", pa.string(), nullable=False),
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("num_frames", pa.int32(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("success", pa.bool_(), nullable=True),
    pa.field("stage_boundaries", pa.list_(pa.int32()), nullable=False),
    pa.field("language_embedding", pa.list_(pa.float32()), nullable=False),
    pa.field("failure_mode", pa.string(), nullable=True),
]
CHUNK_LOCATION_FIELDS = [
    pa.field("chunk_file", pa.list_(pa.string()), nullable=False),
    pa.field("chunk_row_group", pa.list_(pa.int32()), nullable=False),
    pa.field("chunk_start", pa.list_(pa.int32()), nullable=False),
]
CHUNK_LOCATION_COLUMNS = [f.name for f in CHUNK_LOCATION_FIELDS]
EPISODE_INDEX_SCHEMA = pa.schema(_EPISODE_FIELDS + CHUNK_LOCATION_FIELDS)

VISUAL_FIELD = pa.field("visual_embedding", pa.large_list(pa.float32()), nullable=False)
EPISODE_SCHEMA = pa.schema(_EPISODE_FIELDS[:6] + [VISUAL_FIELD] + _EPISODE_FIELDS[6:])

# Columns the training and evaluation readers need; anything else is ignored.
TRAIN_COLUMNS = [
    "episode_id",
    "num_frames",
    "prompt",
    "success",
    "stage_boundaries",
    "visual_embedding",
    "language_embedding",
]

STAGE_FIELDS = [
    pa.field("stage", pa.list_(pa.int32()), nullable=False),
    pa.field("subtask_progress", pa.list_(pa.float32()), nullable=False),
]
STAGE_COLUMNS = [f.name for f in STAGE_FIELDS]

SCORE_PART_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("episode_index", pa.int64(), nullable=False),
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("progress_sparse", pa.float32(), nullable=False),
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("prefix", pa.float32(), nullable=False),
        pa.field("stage", pa.int32(), nullable=True),
        pa.field("subtask_progress", pa.float32(), nullable=True),
        pa.field("success", pa.float32(), nullable=True),
    ]
)
RABC_FIELDS = [
    pa.field("rabc_delta", pa.float32(), nullable=True),
    pa.field("rabc_weight", pa.float32(), nullable=True),
]
SCORE_SCHEMA = pa.schema(list(SCORE_PART_SCHEMA) + RABC_FIELDS)
SCORE_FORMAT = "rayrm.score/1"
SCORE_FILE = "rewards.parquet"
SCORE_PARTS_DIR = "parts"  # under RUN_DIR
SCORE_RUN_FILE = "run.json"  # under RUN_DIR
SCORE_METADATA_KEY = "rayrm.score"
LEROBOT_REWARD_MODEL_KEY = "reward_model_path"  # what LeRobot's SARM reads back
