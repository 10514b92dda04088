"""Where stores live (pipeline/storage/location.py): kinds of roots, joining, credentials, one-line failures."""
from dataclasses import fields

import pytest
from zarr.storage import FsspecStore, LocalStore

from pipeline.config import S3Config, StoreConfig
from pipeline.errors import H2TError
from pipeline.storage import location


def test_kinds_of_roots_and_joining(tmp_path):
    assert location.is_remote("s3://b/p") and location.is_remote("https://h/p") and not location.is_remote(str(tmp_path))
    assert location.read_only_scheme("http://h/x") and not location.read_only_scheme("s3://b/x")
    assert location.local_path("file:///tmp/x") == location.local_path("/tmp/x")
    assert location.join("s3://b/root/", "m", "d", "s.zarr") == "s3://b/root/m/d/s.zarr"
    assert location.join(str(tmp_path), "m", "s.zarr") == str(tmp_path / "m" / "s.zarr")
    assert isinstance(location.zarr_store(str(tmp_path)), LocalStore)
    assert isinstance(location.zarr_store("s3://bucket/p", {"endpoint_url": "http://127.0.0.1:9"}), FsspecStore)
    assert isinstance(location.zarr_store("http://127.0.0.1:9/p"), location.FsspecOnly)


def test_the_endpoint_and_profile_are_settings_but_keys_are_not(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    from_env = location.storage_options(None)
    assert from_env["endpoint_url"] == "http://env:9000"
    assert "key" not in from_env and "secret" not in from_env  # s3fs and obstore read the environment themselves
    ours = location.storage_options(StoreConfig(s3=S3Config(endpoint_url="http://cfg:1", profile="team")))
    assert (ours["endpoint_url"], ours["profile"]) == ("http://cfg:1", "team")
    # the schema has no place for a key: `store.s3.secret=...` is refused when the config is composed
    assert not {f.name for f in fields(S3Config)} & set(location.CREDENTIAL_SETTINGS)


@pytest.mark.parametrize("message,hint", [
    ("SignatureDoesNotMatch: the signature", "AWS_SECRET_ACCESS_KEY"),
    ("Could not connect to the endpoint URL", "AWS_ENDPOINT_URL"),
    ("NoSuchBucket: The specified bucket does not exist", "create the bucket"),
])
def test_remote_failures_are_one_line_with_the_setting_to_check(message, hint):
    line = location.describe_failure("s3://b/root", OSError(message + "\nmore detail"))
    assert "\n" not in line and "s3://b/root" in line and hint in line


def test_http_roots_are_read_only():
    with pytest.raises(H2TError, match="read-only"):
        location.ensure_writable_root("https://files.example/h2t")
    location.ensure_writable_root("s3://bucket/h2t")
