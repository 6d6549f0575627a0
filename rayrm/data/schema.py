"""The data layouts rayrm reads and writes, written down once.

Raw episodes (input, the seed's layout)
---------------------------------------
One HDF5 file holds many episodes; each top-level group is one episode and its name is the
episode id. Episode ids must be unique across all input files.

=================  ================  ==================================================
dataset            dtype / shape     meaning
=================  ================  ==================================================
``side_cam``       uint8 [T,H,W,3]   camera the reward model sees (``embed.camera``)
``wrist_cam``      uint8 [T,H,W,3]   second camera (optional for rayrm)
``tcp_pose``       float [T,P]       end-effector pose (optional for rayrm)
``action``         float [T,A]       actions; T = len(action) when present
=================  ================  ==================================================

Optional attributes of an episode group (the synthetic generator writes all of them):
``prompt`` (str; else the file's ``prompt`` attribute; ``embed.prompt`` overrides both),
``success`` (bool), ``stage_boundaries`` (int [K-1], first frame of stages 2..K),
``num_stages`` (int), ``failure_mode`` (str).

Embedding shards (output of ``rayrm embed``, input of train and evaluate)
-----------------------------------------------------------------------
A folder with ``manifest.json`` (written last; see :data:`MANIFEST_NAME`) and Parquet files
under ``shards/``. One row per episode, so a training worker reads whole episode sequences
without any regrouping:

=======================  ======================  ==========================================
column                   Arrow type              meaning
=======================  ======================  ==========================================
``episode_id``           string                  HDF5 group name
``source_file``          string                  HDF5 file it came from
``num_frames``           int32                   T
``prompt``               string                  task instruction used for the embedding
``success``              bool (nullable)         episode attribute, null when unknown
``stage_boundaries``     list<int32>             ground-truth stage starts (may be empty)
``visual_embedding``     large_list<float32>     T * D values, row-major [T, D]
``language_embedding``   list<float32>           [D_lang], empty for backbones without one
``progress``             list<float32>           (t + 1) / T for t = 0..T-1
=======================  ======================  ==========================================

``D`` and ``D_lang`` are stored in the manifest (``visual_dim``, ``language_dim``).

Stage labels (SARM), added by ``rayrm annotate`` to every row (empty lists for episodes the
stage JSON does not cover); the manifest then also holds ``num_stages`` and ``stage_names``:

=======================  ======================  ==========================================
column                   Arrow type              meaning
=======================  ======================  ==========================================
``stage``                list<int32>             stage index k in 0..K-1 of every frame
``subtask_progress``     list<float32>           (t - s_k + 1) / (s_{k+1} - s_k)
=======================  ======================  ==========================================

``stage_boundaries`` then holds the annotated boundaries (first frames of stages 2..K).
"""

from __future__ import annotations

import pyarrow as pa

CAMERA_KEYS = ("side_cam", "wrist_cam")
POSE_KEY = "tcp_pose"
ACTION_KEY = "action"
MIN_EPISODE_FRAMES = 4  # the window sampler needs a start in [0, T-4] (SEED-SPEC §4)

ATTR_PROMPT = "prompt"
ATTR_SUCCESS = "success"
ATTR_STAGE_BOUNDARIES = "stage_boundaries"
ATTR_NUM_STAGES = "num_stages"
ATTR_FAILURE_MODE = "failure_mode"

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"

EPISODE_SCHEMA = pa.schema(
    [
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("success", pa.bool_(), nullable=True),
        pa.field("stage_boundaries", pa.list_(pa.int32()), nullable=False),
        pa.field("visual_embedding", pa.large_list(pa.float32()), nullable=False),
        pa.field("language_embedding", pa.list_(pa.float32()), nullable=False),
        pa.field("progress", pa.list_(pa.float32()), nullable=False),
    ]
)

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
