"""Embedding on Ray: raw HDF5 episodes in, Parquet embedding chunks out; resumable.

The flow, one module each::

    run.py       the driver: scan the input (metadata only), read back what an earlier attempt
                 committed, run the pipeline, publish (episodes table, failures, manifest)
    pipeline.py  Ray Data: HDF5 read tasks -> actor pool -> chunk writer tasks
    actor.py     the embedding actor (FrameEmbedder)
    prompts.py   prompt vectors and backbone dims, from one Ray task
    ledger.py    what is committed, resume state, the lock
    progress.py  the progress log line

The driver never receives an embedding: write tasks beside the actors write each block's
chunks to the output (local path or URL) and send back their locations only (about 100 bytes
per chunk, whatever the embedding size). The layout, chunked episodes included, is written
down in ``rayrm.data.schema``; writer and reader live in ``rayrm.data.shards``.

Output folder, resume, overwrite
--------------------------------
Everything happens in ``<output>`` itself, with no rename (object stores have none): chunk
files get unique names and are never changed, and the manifest, written last, is the commit.
Readers look for the manifest only, so no partial file or partial set of them is ever visible
to them; an older manifest (and the files it names) stays valid until the new one replaces
it, and files no manifest names are removed after the commit.

=====================================================  ===================================
found at start                                         the run
=====================================================  ===================================
nothing                                                starts a new run (``<output>/_run``)
``_run`` with the same settings                        resumes it (whatever ``overwrite``)
``_run`` with other settings, or holding episodes      error; ``overwrite: true`` discards
no longer in the input (or with other frame counts)    it and starts again
a published ``<output>`` (or any other content)        error unless ``overwrite: true``;
                                                       the old output stays readable until
                                                       the new manifest replaces it
``_run`` locked by a running embed (local paths)       error
=====================================================  ===================================

Exactly once: the episodes table names, for every episode, chunks that tile its frames once
(``rayrm.data.chunks.tile_chunks``), chosen among everything this run committed, repeats from
retried tasks included; before publishing, every episode that did not fail must have one.

Bad input
---------
A problem of one episode does not stop the others: unreadable files, missing camera, wrong
dtype or shape, too few frames, NaN in pose or action, bad stage boundaries, a repeated
episode id (found by the scan), frames that fail to read, non-finite embeddings (found by
the writer tasks). Each is a row of the failures table (``file``, ``episode``, ``key``,
``reason``; episode ``-`` for a whole file). At the end, if more episodes failed than
``max_failed_episodes`` (default 0; -1 allows any number), the run raises
:class:`InvalidEpisodesError` (the CLI exits with 2) and publishes nothing; ``_run`` keeps the
failures table and the committed chunks stay. Fix or remove the bad inputs, or allow them,
and rerun: it resumes, and retries only the failed episodes. Within the limit the output is
published with its failures table and ``num_failed_episodes`` in the manifest.
Abort at once, before any frame is read: unknown backbone, an output location that cannot be
written (missing bucket, no credentials), no input files, an existing output without
``overwrite``. Errors that are not about one episode (the backbone raising, a lost cluster, a
full disk) abort the run; committed chunks stay for the rerun.

Run: ``rayrm embed --config configs/demo.yaml`` (or ``jobs/embed.py`` on a cluster). Rerunning
the same command after a crash resumes.
"""

from rayrm.data.hdf5 import InvalidEpisodesError
from rayrm.embed.actor import FrameEmbedder
from rayrm.embed.episodes import episode_rows_dataset
from rayrm.embed.ledger import ResumeError, run_dir
from rayrm.embed.pipeline import build_dataset
from rayrm.embed.prompts import PromptVectors, PromptVectorsTask, prompt_vectors
from rayrm.embed.run import EmbedResult, failed_episodes, run_embed

__all__ = [
    "EmbedResult",
    "FrameEmbedder",
    "InvalidEpisodesError",
    "PromptVectors",
    "PromptVectorsTask",
    "ResumeError",
    "build_dataset",
    "episode_rows_dataset",
    "prompt_vectors",
    "failed_episodes",
    "run_dir",
    "run_embed",
]
