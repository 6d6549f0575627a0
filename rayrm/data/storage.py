"""Where rayrm reads and writes: local paths and URLs, through one pyarrow file system layer.

Every path in a config is a local path or a URL (``s3://bucket/key``, ``gs://bucket/key``,
``file:///abs/path``, or any scheme ``pyarrow.fs.FileSystem.from_uri`` knows). This module is
the only place that turns one into a file system and a path, so embed, annotate, train and
evaluate handle both the same way. Credentials and endpoints come from the usual environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` for S3-compatible servers, ...), as for any
pyarrow or Ray Train user; rayrm adds none of its own.

Commits without renames
-----------------------
Object storage has no atomic rename, so nothing here relies on one:

- :func:`write_bytes` makes a file appear whole or not at all. The bytes are built in memory
  first; an object store's PUT then publishes them in one step, and a local file is written
  under a temporary name, flushed to disk and renamed (a rename *is* atomic there).
- Writers give every data file a unique name and never change a file once written; a small
  manifest, written last with :func:`write_bytes`, lists the files that belong to a result.
  Readers trust only the manifest, so a crash leaves at most files no manifest names.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import posixpath
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

logger = logging.getLogger(__name__)


class StorageError(OSError):
    """A location that cannot be used: missing bucket, no credentials, not writable."""


def is_url(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL alike."""
    if is_url(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    if is_url(path):
        scheme, _, rest = path.rstrip("/").partition("://")
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def absolute(path: str) -> str:
    """A URL as it is; a local path made absolute (Ray workers run in other folders)."""
    return path if is_url(path) else os.path.abspath(path)


@functools.lru_cache(maxsize=32)
def _filesystem(root: str) -> pafs.FileSystem:
    """One file system object per scheme and bucket (S3 clients are costly to build)."""
    return pafs.FileSystem.from_uri(root)[0]


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path within it): ``s3://bucket/key`` -> (the bucket's, ``bucket/key``);
    ``/a/b`` or ``file:///a/b`` -> (the local one, ``/a/b``).

    The path is cut by hand: ``from_uri`` on every file would build a new S3 client each
    time, and a URL parser would take a glob's ``?`` for a query."""
    if not is_url(path):
        return _filesystem("file:///"), os.path.abspath(path)
    scheme, _, rest = path.partition("://")
    if scheme == "file":
        return _filesystem("file:///"), urllib.parse.unquote(rest)
    if scheme in ("s3", "gs", "gcs"):
        bucket = rest.split("/", 1)[0]
        return _filesystem(f"{scheme}://{bucket}"), urllib.parse.unquote(rest).rstrip("/")
    return pafs.FileSystem.from_uri(path)  # hdfs and the rest: paths of their own form


def as_url(like: str, fs_path: str) -> str:
    """The location of ``fs_path`` (a path within ``like``'s file system) in ``like``'s form."""
    if not is_url(like):
        return fs_path
    return f"{like.partition('://')[0]}://{fs_path}"


def is_local(path: str) -> bool:
    return isinstance(filesystem(path)[0], pafs.LocalFileSystem)


# --------------------------------------------------------------------------- looking


def info(path: str) -> pafs.FileInfo:
    fs, key = filesystem(path)
    return fs.get_file_info(key)


def exists(path: str) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_file(path: str) -> bool:
    return info(path).type == pafs.FileType.File


def is_dir(path: str) -> bool:
    return info(path).type == pafs.FileType.Directory


def listdir(path: str) -> list[str]:
    """Names directly under ``path`` (files and folders), sorted; [] when it does not exist."""
    fs, key = filesystem(path)
    found = fs.get_file_info(pafs.FileSelector(key, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in found)


def list_files(path: str, recursive: bool = False) -> list[str]:
    """Every file under ``path`` as full locations in ``path``'s form, sorted."""
    fs, key = filesystem(path)
    found = fs.get_file_info(pafs.FileSelector(key, recursive=recursive, allow_not_found=True))
    return sorted(as_url(path, i.path) for i in found if i.type == pafs.FileType.File)


# --------------------------------------------------------------------------- reading


def open_input(path: str) -> pa.NativeFile:
    """A random-access file (h5py and Parquet read from it)."""
    fs, key = filesystem(path)
    return fs.open_input_file(key)


def read_bytes(path: str) -> bytes:
    with open_input(path) as f:
        return f.read()


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def read_text(path: str) -> str:
    return read_bytes(path).decode()


# --------------------------------------------------------------------------- writing


def makedirs(path: str) -> None:
    """A folder (object stores have none: a no-op there, no marker object is made)."""
    fs, key = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(key, recursive=True)


def write_bytes(path: str, data: bytes) -> None:
    """``path`` appears with all of ``data`` or not at all (see the module docstring)."""
    fs, key = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        _write_local(key, data)
        return
    with fs.open_output_stream(key) as out:
        out.write(data)


def _write_local(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not outlive the data on a power cut
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str, data: Any) -> None:
    write_bytes(path, json.dumps(data, indent=2).encode())


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def parquet_bytes(table: pa.Table, **options: Any) -> bytes:
    """``table`` as a Parquet file in memory (``options`` go to ``pq.write_table``)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return sink.getvalue().to_pybytes()


def write_parquet(table: pa.Table, path: str, **options: Any) -> int:
    """Write ``table`` to ``path`` whole or not at all; returns the file's size in bytes."""
    data = parquet_bytes(table, **options)
    write_bytes(path, data)
    return len(data)


def delete(path: str) -> None:
    """Remove a file or a folder and everything in it; nothing there is fine."""
    fs, key = filesystem(path)
    kind = fs.get_file_info(key).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(key)
    elif kind == pafs.FileType.File:
        fs.delete_file(key)


def remove_if_empty(path: str) -> None:
    """A local folder left empty (a run that failed before writing anything); object stores
    have no empty folders."""
    local = filesystem(path)[1]
    if is_local(path) and os.path.isdir(local) and not os.listdir(local):
        os.rmdir(local)


def copy_folder(source: str, target: str) -> None:
    """Every file under ``source`` to the same place under ``target`` (either may be a URL)."""
    src_fs, src = filesystem(source)
    dst_fs, dst = filesystem(target)
    makedirs(target)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


@contextlib.contextmanager
def local_folder(path: str) -> Iterator[str]:
    """``path`` as a local folder: itself when local, else a temporary download of it."""
    if is_local(path):
        yield filesystem(path)[1]
        return
    with tempfile.TemporaryDirectory(prefix="rayrm-") as tmp:
        copy_folder(path, tmp)
        yield tmp


@contextlib.contextmanager
def staged_output(path: str) -> Iterator[str]:
    """A local folder to write ``path``'s files in; uploaded on success when ``path`` is not
    local (plots, videos and HTML are written by libraries that want local files)."""
    if is_local(path):
        local = filesystem(path)[1]
        os.makedirs(local, exist_ok=True)
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="rayrm-out-") as tmp:
        yield tmp
        copy_folder(tmp, path)


# --------------------------------------------------------------------------- checks


def check_writable(path: str, what: str) -> None:
    """Fail before any work when ``path`` cannot take files: a missing bucket, no or wrong
    credentials, a read-only folder. Remote: writes and deletes one tiny probe file; local:
    the nearest existing folder must be writable (nothing is created)."""
    if is_local(path):
        folder = filesystem(path)[1]
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if os.path.isfile(folder) and folder != filesystem(path)[1]:
            raise StorageError(f"{what}={path}: {folder} is a file")
        if not os.access(folder if os.path.isdir(folder) else os.path.dirname(folder), os.W_OK):
            raise StorageError(f"{what}={path}: {folder} is not writable")
        return
    probe = join(path, f".rayrm-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"")
        delete(probe)
    except OSError as err:
        raise StorageError(f"{what}={path}: cannot write there: {_short(err)}") from err


def check_readable(path: str, what: str) -> None:
    """Fail before any work when ``path`` is missing or cannot be listed."""
    try:
        found = exists(path)
    except OSError as err:
        raise StorageError(f"{what}={path}: cannot read there: {_short(err)}") from err
    if not found:
        raise StorageError(f"{what}={path}: nothing there")


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
