"""Where stores live: a local directory, `file://`, an S3-compatible bucket (`s3://`), or read-only `http(s)://`.

Everything else talks to zarr stores built here, so local and remote roots share one code path.
"""
from __future__ import annotations

import os
from pathlib import Path

from zarr.storage import FsspecStore, LocalStore, WrapperStore

from ..config import S3Config, StoreConfig
from ..errors import H2TError

REMOTE_SCHEMES = ("s3://", "http://", "https://")


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def read_only_scheme(path: str) -> bool:
    return str(path).startswith(("http://", "https://"))


def local_path(path: str) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()


def join(root: str, *parts: str) -> str:
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return str(local_path(root).joinpath(*parts))


CREDENTIAL_SETTINGS = ("key", "secret", "token", "access_key_id", "secret_access_key", "session_token")
WHERE_CREDENTIALS_GO = ("credentials are not settings (runs save their settings in .hydra/): export "
                        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, put them in ~/.aws/credentials, or name a "
                        "profile with store.s3.profile")


def storage_options(settings: StoreConfig | None = None) -> dict:
    """fsspec options for s3:// roots: the endpoint (store.s3.endpoint_url, else AWS_ENDPOINT_URL) and a named
    profile (store.s3.profile); keys come from the environment or the AWS credential files, never settings
    (the schema has no field for them)."""
    s3 = settings.s3 if settings is not None else S3Config()
    endpoint = s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    options: dict = {"config_kwargs": {"retries": {"max_attempts": 2}, "connect_timeout": 5, "read_timeout": 60}}
    if endpoint:
        options["endpoint_url"] = endpoint
    if s3.profile:
        options["profile"] = s3.profile
    return options


class FsspecOnly(WrapperStore):
    """An fsspec store read through zarr's own codec pipeline. The Rust pipeline reads http roots with its
    own client, which needs HTTP range requests; fsspec's also serves servers that ignore them."""


def zarr_store(path: str, options: dict | None = None, read_only: bool = False):
    """The zarr store object for a store path."""
    if str(path).startswith("s3://"):
        return FsspecStore.from_url(str(path), storage_options=options or {}, read_only=read_only)
    if read_only_scheme(path):
        return FsspecOnly(FsspecStore.from_url(str(path), read_only=True))
    return LocalStore(str(local_path(path)), read_only=read_only)


def describe_failure(path: str, exc: BaseException) -> str:
    """One line for a remote failure: credentials, endpoint or missing bucket."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    lowered = text.lower()
    if any(word in lowered for word in ("signature", "accessdenied", "access denied", "forbidden", "invalidaccesskey")):
        hint = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials or store.s3.profile"
    elif any(word in lowered for word in ("connect", "endpoint", "timed out", "timeout", "unreachable")):
        hint = "check store.s3.endpoint_url or AWS_ENDPOINT_URL"
    elif "bucket" in lowered:
        hint = "create the bucket first"
    else:
        hint = "check the store root"
    return f"cannot use store root {path}: {type(exc).__name__}: {text} ({hint})"


def ensure_writable_root(root: str) -> None:
    if read_only_scheme(root):
        raise H2TError(f"store.root={root} is read-only (http/https): extract to a local or s3:// root first")
