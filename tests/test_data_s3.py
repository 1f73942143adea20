"""Data commands and the loader against a real SeaweedFS S3 server on loopback."""

import pytest

from pipeline import storage

pytestmark = pytest.mark.s3


def test_fixture_gives_a_working_private_bucket(s3_env):
    uri = storage.join(s3_env.uri, "x", "hello.json")
    storage.write_json_atomic(uri, {"hello": 1})
    assert storage.read_json(uri) == {"hello": 1}
    assert s3_env.keys() == ["x/hello.json"]
