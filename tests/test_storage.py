import os

import pytest

from pipeline import storage
from pipeline.errors import UserError


def test_local_atomic_write_and_read(tmp_path):
    uri = str(tmp_path / "a" / "b.json")
    storage.write_json_atomic(uri, {"x": 1})
    assert storage.read_json(uri) == {"x": 1}
    assert storage.exists(uri)
    assert storage.listdir(str(tmp_path / "a")) == ["b.json"]
    # no temporary left behind
    assert [p for p in os.listdir(tmp_path / "a") if ".tmp-" in p] == []


def test_staged_file_publishes_only_on_success(tmp_path):
    target = str(tmp_path / "out.bin")
    with pytest.raises(RuntimeError):
        with storage.staged_file(target) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("crash while writing")
    assert not os.path.exists(target)
    assert os.listdir(tmp_path) == []
    with storage.staged_file(target) as tmp:
        open(tmp, "wb").write(b"whole")
    assert open(target, "rb").read() == b"whole"


def test_missing_file_is_a_user_error_naming_it(tmp_path):
    uri = str(tmp_path / "nope.json")
    with pytest.raises(UserError, match="nope.json: not found"):
        storage.read_json(uri)


def test_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n"a": }')
    with pytest.raises(UserError, match=r"bad.json: not valid JSON \(line 2"):
        storage.read_json(str(p))


def test_s3_uri_without_bucket_and_unknown_scheme():
    with pytest.raises(UserError, match="needs a bucket"):
        storage.resolve("s3://")
    with pytest.raises(UserError, match="unsupported scheme 'gs'"):
        storage.resolve("gs://bucket/x")


def test_join_and_parent():
    assert storage.join("s3://b/p", "x", "y") == "s3://b/p/x/y"
    assert storage.parent("s3://b/p/run") == "s3://b/p"
    assert storage.basename("s3://b/p/run/") == "run"


def test_a_file_where_a_folder_is_needed_is_a_user_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="a file stands where a folder is needed"):
        storage.write_text_atomic(str(tmp_path / "afile" / "sub" / "r.html"), "page")
    with pytest.raises(UserError, match="afile/sub: a file stands"):
        storage.makedirs(str(tmp_path / "afile" / "sub"))
