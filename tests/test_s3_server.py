"""The moto S3 server of ``tests/_s3.py``: it serves pyarrow through the environment alone,
and a stopped one fails fast and comes back on its port (seconds per test)."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from _s3 import S3Server


def test_parquet_round_trip_through_from_uri(s3_server):
    url = s3_server.create_bucket("round-trip") + "/dir/x.parquet"
    table = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    pq.write_table(table, url)  # no filesystem argument: from_uri and the environment
    assert pq.read_table(url).equals(table)
    fs, path = pafs.FileSystem.from_uri(url)
    assert path == "round-trip/dir/x.parquet"
    assert fs.get_file_info(path).type == pafs.FileType.File
    assert s3_server.list_keys("round-trip") == ["dir/x.parquet"]


def test_missing_bucket_shows_at_the_bucket_root(s3_server):
    fs, path = pafs.FileSystem.from_uri("s3://no-such-bucket/run/x.parquet")
    # The cheap check: one HEAD request, NotFound rather than an error.
    assert fs.get_file_info("no-such-bucket").type == pafs.FileType.NotFound
    with pytest.raises(OSError, match="NO_SUCH_BUCKET"):
        pq.write_table(pa.table({"a": [1]}), path, filesystem=fs)


def test_stopped_server_fails_fast_and_restarts_on_its_port():
    server = S3Server()
    with server.running_server():
        fs = server.filesystem(timeout=1)
        server.create_bucket("kept")
        with fs.open_output_stream("kept/obj") as out:
            out.write(b"payload")
        endpoint = server.endpoint

        server.stop(keep_data=True)
        start = time.monotonic()
        with pytest.raises(OSError, match="Could not connect"):
            fs.get_file_info("kept/obj")
        assert time.monotonic() - start < 5

        server.start()
        assert server.endpoint == endpoint
        with fs.open_input_stream("kept/obj") as f:  # the same filesystem object again
            assert f.read() == b"payload"


def test_require_auth_rejects_wrong_keys():
    server = S3Server()
    with server.running_server():
        server.create_bucket("private")
        good = server.require_auth()
        wrong = server.filesystem(access_key=good["AWS_ACCESS_KEY_ID"], secret_key="wrong")
        with pytest.raises(OSError, match="ACCESS_DENIED"):
            wrong.get_file_info("private")
        assert server.filesystem().get_file_info("private").type == pafs.FileType.Directory
