"""Leases on units of extraction work, so several `h2t extract` processes can fill one store together.

A claim is an object `claims/<unit>` inside the store holding its owner and expiry. It is created with
`set_if_not_exists` (atomic on local disks: a hard link) and read back to see who won. A claim expires
`ttl_s` after it was taken, or at once when its owner was a process on this host that no longer exists;
then anyone may take it over, which is how a dead writer's shard is finished.
An expired claim is taken over by one writer only, and a renewal never overwrites a taker's claim: on a local
disk both replace a claim only under an exclusive lock on the store's folder (`flock`, which every process
on the host, and NFS clients, honour) after reading it again there; on s3:// by a conditional put (`If-Match`
on the entity tag read with it), which the server refuses once anyone else has replaced it. On s3:// the create is a
conditional put too (`If-None-Match: *` through obstore's atomic create, refused when the object exists),
after an existence check, so a server that ignores conditions degrades to check-then-put; then two writers
can hold one shard, and as extraction is deterministic both write the same bytes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import botocore.session
import obstore
from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError
from obstore.store import S3Store
from zarr.storage import LocalStore

from . import zarr_compat

if TYPE_CHECKING:
    from obstore.store import S3Config  # a type only: not importable at runtime


class Claims:
    def __init__(self, zstore, ttl_s: float):
        self.store, self.ttl_s = zstore, float(ttl_s)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held: set[str] = set()
        # a renewal and a release of one claim never interleave: a renewal after the release would make it again
        self._renewing = threading.Lock()
        # Local stores are claimed with direct file operations in the calling thread: through zarr's event
        # loop each took a thread hop, which cost ~20 ms a claim on two busy cores.
        self.root = Path(zstore.root) if isinstance(zstore, LocalStore) else None
        # On s3:// claims are read with their entity tags and replaced only if unchanged (conditional puts)
        self.s3 = _s3_objects(zstore)

    def _read(self, key: str) -> dict | None:
        return self._read_tagged(key)[0]

    def _read_tagged(self, key: str) -> tuple[dict | None, str | None]:
        """A claim and, on s3://, the entity tag a conditional replacement of it names (else None)."""
        data: bytes | None
        tag = None
        if self.root is not None:  # a local store: read in this thread (no hop to zarr's event loop)
            try:
                data = (self.root / key).read_bytes()
            except FileNotFoundError:
                data = None
        elif self.s3 is not None:
            objects, prefix = self.s3
            try:
                found = obstore.get(objects, f"{prefix}{key}")
            except (FileNotFoundError, NotFoundError):  # obstore raises the builtin for a missing object
                return None, None
            data, tag = found.bytes().to_bytes(), found.meta["e_tag"]
        else:
            data = zarr_compat.run(zarr_compat.get_bytes(self.store, key))
        return (None if data is None else _parse(data)), tag

    def try_claim(self, unit: str) -> bool:
        """Take the unit if nobody (this process included) holds a live claim on it."""
        if unit in self.held:
            return False
        key = f"claims/{unit}"
        body = json.dumps({"owner": self.owner, "expires": time.time() + self.ttl_s}).encode()
        for _attempt in range(2):
            if self.root is not None:
                create_local(self.root / key, body)
            else:
                zarr_compat.run(create_if_absent(self.store, key, body))
            current, tag = self._read_tagged(key)
            if current is None:
                continue  # released since: create it again (deleting here could delete a newer claim)
            if current.get("owner") == self.owner:
                self.held.add(unit)
                return True
            if current.get("expires", 0.0) > time.time() and self._owner_alive(current):
                return False
            if self._take_over(key, current, tag, body):  # expired (its owner died or stalled)
                self.held.add(unit)
                return True
        return False

    def _take_over(self, key: str, seen: dict, tag: str | None, body: bytes) -> bool:
        """End the expired claim `seen` (read with entity tag `tag`). Two writers may take one over at once, and
        only the claim read goes: on s3:// it is replaced by `body` (this writer's claim) with a put conditional
        on `tag`, refused when anyone else replaced or released it since; on a local store it is replaced by
        `body` under the store's lock if it is still the one read. Other stores delete it (a plain delete can
        remove a claim made since: two writers may then hold one unit). True when `body` replaced it; else the
        caller creates its claim again."""
        if self.s3 is not None and tag is not None:
            return self._put_if_unchanged(key, body, tag)
        if self.root is None:
            zarr_compat.run(self.store.delete(key))
            return False
        with self._locked():
            if self._read(key) != seen:  # replaced or released since it was read
                return False
            return _replace_local(self.root / key, body)

    def _put_if_unchanged(self, key: str, body: bytes, tag: str) -> bool:
        """On s3://, write `body` over the claim only while it is the one read with entity tag `tag`
        (`If-Match`); False when the server refuses: anyone else replaced or released it since."""
        assert self.s3 is not None
        objects, prefix = self.s3
        try:
            obstore.put(objects, f"{prefix}{key}", body, mode={"e_tag": tag})
            return True
        except (PreconditionError, FileNotFoundError, NotFoundError):
            return False

    @staticmethod
    def _owner_alive(claim: dict) -> bool:
        """A claim from this host whose process is gone is dead at once; other hosts wait for expiry."""
        host, _, rest = str(claim.get("owner", "")).partition(":")
        pid = rest.partition(":")[0]
        if host != socket.gethostname() or not pid.isdigit():
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def held_by_others(self, pattern) -> list[str]:
        """Units matching `pattern` (a compiled regex) on which another live process holds a claim."""
        out = []
        for unit in (key.removeprefix("claims/") for key in zarr_compat.collect(self.store.list_prefix("claims/"))):
            if unit in self.held or not pattern.match(unit):
                continue
            claim = self._read(f"claims/{unit}")
            if claim is not None and claim.get("owner") != self.owner and claim.get("expires", 0.0) > time.time() \
                    and self._owner_alive(claim):
                out.append(unit)
        return out

    def renew(self, unit: str) -> bool:
        """Push a held claim's lapse `ttl_s` from now; False when it is no longer this process's."""
        with self._renewing:
            return self._renew(unit)

    def _renew(self, unit: str) -> bool:
        key = f"claims/{unit}"
        with self._locked():  # on a local store no taker replaces the claim between this read and the write
            current, tag = self._read_tagged(key)
            if unit not in self.held or current is None or current.get("owner") != self.owner:
                return False
            body = json.dumps({"owner": self.owner, "expires": time.time() + self.ttl_s}).encode()
            if self.root is not None:
                return _replace_local(self.root / key, body)
        if self.s3 is not None and tag is not None:  # only if still the claim read: never over a taker's
            return self._put_if_unchanged(key, body, tag)
        zarr_compat.run(zarr_compat.set_bytes(self.store, key, body))
        return True

    @contextlib.contextmanager
    def kept(self, unit: str | None = None) -> Iterator[None]:
        """Renew a held claim (`unit`; None: every claim held at the time) every third of its lease while the
        block runs: work that may outlast the lease (a widening rewrites a tap's every row; a shard of a large
        model on a CPU) is not taken over by a writer that thinks it stalled."""
        stop = threading.Event()

        def renew_until_stopped() -> None:
            while not stop.wait(self.ttl_s / 3):
                with self._renewing:
                    kept = [self._renew(held) for held in ([unit] if unit is not None else list(self.held))]
                if unit is not None and not kept[0]:
                    return  # no longer this process's: nothing left to keep

        renewer = threading.Thread(target=renew_until_stopped, name="h2t-claim-renew", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()

    def release_all(self) -> None:
        for unit in list(self.held):
            self.release(unit)

    def release(self, unit: str) -> None:
        with self._renewing, self._locked():
            self.held.discard(unit)
            key = f"claims/{unit}"
            current = self._read(key)
            if current is not None and current.get("owner") == self.owner:
                self._delete(key)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """On a local store, an exclusive lock on the store's folder (never removed while the store exists, so
        every process locks the same inode; a lock file inside would be litter): replacements and removals of
        claims by all processes exclude each other. Elsewhere nothing: s3:// replaces conditionally."""
        try:
            fd = None if self.root is None else os.open(self.root, os.O_RDONLY)
        except FileNotFoundError:  # the store is gone (removed): no claim left to protect
            fd = None
        if fd is None:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the lock

    def _delete(self, key: str) -> None:
        if self.root is not None:
            path = self.root / key
            path.unlink(missing_ok=True)
            # folders left empty go too: zarr's listing of a store warns about a folder that is no node. A writer
            # creating a claim there meanwhile keeps it (not empty) or makes it again (create_local).
            for folder in path.parents:
                if folder == self.root:
                    break
                try:
                    folder.rmdir()
                except OSError:  # not empty: another claim lives there
                    break
        else:
            zarr_compat.run(self.store.delete(key))


def _parse(data: bytes) -> dict:
    try:
        return json.loads(data)
    except ValueError:
        return {"owner": "?", "expires": 0.0}  # a torn claim counts as expired


def _replace_local(path: Path, body: bytes) -> bool:
    """Replace a claim file whole (written beside it, then renamed over it: a reader never finds it torn);
    False when its folder went with a release elsewhere (the claim is gone)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        tmp.write_bytes(body)
    except FileNotFoundError:
        return False
    os.replace(tmp, path)
    return True


def create_local(path: Path, body: bytes) -> bool:
    """Create a file unless it exists, atomically: written beside it, then hard-linked to its name (a link
    fails when the name exists). True if this call created it."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    for attempt in range(3):  # a release elsewhere may remove the folder it found empty (Claims._delete)
        try:
            tmp.write_bytes(body)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
            path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _s3_fs(store):
    """The fsspec filesystem of a zarr store on s3://, else None."""
    fs = getattr(store, "fs", None)
    return fs if fs is not None and "s3" in fs.protocol else None  # protocol is a name or a tuple of names


def _s3_objects(store) -> tuple[S3Store, str] | None:
    """For a zarr store on s3://, obstore's S3Store of its bucket and the store's key prefix in it; else None."""
    fs = _s3_fs(store)
    if fs is None:
        return None
    bucket, _, prefix = str(store.path).strip("/").partition("/")
    return _object_store(fs, bucket), f"{prefix}/" if prefix else ""


async def create_if_absent(store, key: str, body: bytes) -> None:
    """Write `key` unless it exists; on S3 atomically, through a conditional put the server arbitrates."""
    fs = _s3_fs(store)
    if fs is None:
        await zarr_compat.set_bytes_if_absent(store, key, body)
        return
    if not await store.exists(key):
        await put_if_absent(fs, f"{store.path}/{key}", body)


async def put_if_absent(fs, path: str, body: bytes) -> bool:
    """One S3 PUT with `If-None-Match: *` through obstore's atomic create (`mode="create"`, a public API):
    True if this call created the object, False if it existed."""
    bucket, _, key = path.partition("/")
    try:
        await obstore.put_async(_object_store(fs, bucket), key, body, mode="create")
        return True
    except AlreadyExistsError:
        return False


_OBJECT_STORES: dict[tuple, S3Store] = {}


def _object_store(fs, bucket: str):
    """An obstore S3Store for the bucket, configured like the fsspec filesystem zarr uses."""
    options = dict(getattr(fs, "storage_options", {}) or {})
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url") \
        or os.environ.get("AWS_ENDPOINT_URL")
    if options.get("key") and options.get("secret"):  # given in code (an API caller's options, in memory)
        key, secret, token = options["key"], options["secret"], options.get("token")
    else:
        key, secret, token = _credentials(options.get("profile"))
    region = (options.get("client_kwargs") or {}).get("region_name") or os.environ.get("AWS_REGION") \
        or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    cache_key = (bucket, endpoint, key, region, options.get("profile"))
    if cache_key not in _OBJECT_STORES:
        config: S3Config = {"region": region}
        if endpoint:
            config["endpoint"] = endpoint
        if key and secret:
            config["access_key_id"], config["secret_access_key"] = key, secret
            if token:
                config["session_token"] = token  # obstore's documented name ("token" is its alias)
        _OBJECT_STORES[cache_key] = S3Store(bucket, config=config,
                                            client_options={"allow_http": str(endpoint or "").startswith("http://")})
    return _OBJECT_STORES[cache_key]


def _credentials(profile: str | None) -> tuple[str | None, str | None, str | None]:
    """Keys as s3fs finds them (botocore's chain: the environment, ~/.aws/credentials and config, the named
    profile): obstore is given the same ones, in memory only."""
    found = botocore.session.Session(profile=profile).get_credentials()
    if found is None:
        return None, None, None
    frozen = found.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token
