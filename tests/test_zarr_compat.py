"""pipeline/storage/zarr_compat.py against the installed zarr and fsspec: every function the storage layer
uses from their private API, called for real. When an upgrade moves one of them, the failure names the
function and the library versions."""
import asyncio
import importlib
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import pytest
import zarr
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.codec import CodecPipeline
from zarr.codecs import BytesCodec, ShardingCodec
from zarr.storage import LocalStore, MemoryStore

from pipeline.storage import zarr_compat

VERSIONS = f"zarr {zarr.__version__}, fsspec {fsspec.__version__}"


def broke(name: str, detail: str = "") -> str:
    return f"zarr_compat.{name} no longer works with {VERSIONS}" + (f": {detail}" if detail else "")


def call(name: str, *args, **kwargs):
    """zarr_compat.<name>(*args), any exception reported as that function breaking under these versions."""
    try:
        return getattr(zarr_compat, name)(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever the library changed, say where
        pytest.fail(broke(name, f"{type(exc).__name__}: {exc}"))


def test_run_and_io_loop():
    loop = call("io_loop")
    assert isinstance(loop, asyncio.AbstractEventLoop) and loop.is_running(), broke("io_loop", "not a running loop")

    async def where():
        return asyncio.get_running_loop()
    assert call("run", where()) is loop, broke("run", "the coroutine did not run on zarr's event loop")


def test_set_io_executor():
    loop = call("io_loop")
    previous = getattr(loop, "_default_executor", None)  # put back after the test (asyncio's own attribute)
    pool = ThreadPoolExecutor(2, thread_name_prefix="compat-test")
    try:
        call("set_io_executor", pool)

        async def thread_name():
            return await asyncio.get_running_loop().run_in_executor(None, lambda: threading.current_thread().name)
        name = call("run", thread_name())
        assert name.startswith("compat-test"), broke("set_io_executor", f"blocking calls ran in {name}")
    finally:
        if previous is not None:
            loop.set_default_executor(previous)
        pool.shutdown(wait=False)


def test_collect(tmp_path):
    store = LocalStore(str(tmp_path))
    for key in ("a/1", "a/2", "b"):
        call("run", call("set_bytes", store, key, key.encode()))
    assert sorted(call("collect", store.list_prefix("a/"))) == ["a/1", "a/2"], broke("collect")
    assert sorted(n.rstrip("/") for n in call("collect", store.list_dir(""))) == ["a", "b"], broke("collect")


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_bytes_in_and_out_of_a_store(tmp_path, kind):
    store = LocalStore(str(tmp_path)) if kind == "local" else MemoryStore()
    assert call("run", call("get_bytes", store, "absent")) is None, broke("get_bytes", "an absent key")
    call("run", call("set_bytes", store, "x/y", b"\x00one"))
    assert call("run", call("get_bytes", store, "x/y")) == b"\x00one", broke("set_bytes/get_bytes")
    call("run", call("set_bytes_if_absent", store, "x/y", b"two"))
    assert call("run", call("get_bytes", store, "x/y")) == b"\x00one", broke("set_bytes_if_absent", "overwrote")
    call("run", call("set_bytes_if_absent", store, "x/z", b"three"))
    assert call("run", call("get_bytes", store, "x/z")) == b"three", broke("set_bytes_if_absent", "did not write")
    target = MemoryStore()
    call("run", call("copy_object", store, target, "x/y"))
    assert call("run", call("get_bytes", target, "x/y")) == b"\x00one", broke("copy_object")


def test_create_arrays(tmp_path):
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    arrays = call("create_arrays", group, [
        ("a/x", dict(shape=(10, 4), dtype="float32", chunks=(5, 4), overwrite=True)),
        ("y", dict(shape=(3,), dtype="uint8", chunks=(1,), fill_value=1, overwrite=True))])
    assert [type(a) for a in arrays] == [zarr.Array, zarr.Array], broke("create_arrays", "not zarr.Array objects")
    assert [a.path for a in arrays] == ["a/x", "y"] and arrays[0].shape == (10, 4), broke("create_arrays")
    arrays[0][:] = np.ones((10, 4), np.float32)
    reopened = zarr.open_group(str(tmp_path / "g"), mode="r")
    assert reopened["a/x"][:].sum() == 40 and reopened["y"][:].tolist() == [1, 1, 1], broke("create_arrays")


def test_copy_tree(tmp_path):
    for name in ("src/a", "src/sub/b"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    fs = AsyncFileSystemWrapper(LocalFileSystem())
    call("run", call("copy_tree", fs, str(tmp_path / "src"), str(tmp_path / "dst")))
    assert (tmp_path / "dst/a").read_bytes() == b"src/a", broke("copy_tree")
    assert (tmp_path / "dst/sub/b").read_bytes() == b"src/sub/b", broke("copy_tree", "not recursive")
    s3fs = pytest.importorskip("s3fs")  # the filesystem it serves: server-side copies on S3
    assert inspect.iscoroutinefunction(getattr(s3fs.S3FileSystem, "_copy", None)), \
        broke("copy_tree", f"s3fs {s3fs.__version__} has no coroutine S3FileSystem._copy")


def test_chunk_key_names_the_object_zarr_writes(tmp_path):
    sharded = zarr.create_array(store=str(tmp_path / "s"), shape=(20, 12), dtype="float16", chunks=(10, 4),
                                shards=(10, 12), zarr_format=3)
    sharded[:] = 1
    key = call("chunk_key", sharded, (1, 0))
    assert key == "c/1/0" and (tmp_path / "s" / key).is_file(), broke("chunk_key", f"{key!r} for shard (1, 0)")
    ledger = zarr.create_array(store=str(tmp_path / "l"), shape=(4,), dtype="uint8", chunks=(1,), compressors=None,
                               zarr_format=3)
    ledger[3] = 1
    key = call("chunk_key", ledger, (3,))
    assert key == "c/3" and (tmp_path / "l" / key).read_bytes() == b"\x01", broke("chunk_key", f"{key!r} for (3,)")


def test_array_codecs(tmp_path):
    sharded = zarr.create_array(store=str(tmp_path / "s"), shape=(20, 12), dtype="float16", chunks=(10, 4),
                                shards=(10, 12), zarr_format=3)
    codecs = call("array_codecs", sharded)
    assert len(codecs) == 1 and isinstance(codecs[0], ShardingCodec), broke("array_codecs", repr(codecs))
    assert isinstance(list(codecs[0].codecs)[0], BytesCodec), broke("array_codecs", "inner codecs")
    raw = zarr.create_array(store=str(tmp_path / "r"), shape=(4,), dtype="uint8", chunks=(1,), compressors=None,
                            zarr_format=3)
    assert [type(c) for c in call("array_codecs", raw)] == [BytesCodec], broke("array_codecs", "unsharded")
    v2 = zarr.create_array(store=str(tmp_path / "v2"), shape=(4,), dtype="uint8", chunks=(2,), zarr_format=2)
    assert call("array_codecs", v2) is None, broke("array_codecs", "a Zarr v2 array")


@pytest.mark.parametrize("name", sorted(zarr_compat.CODEC_PIPELINE_PATHS))
def test_codec_pipelines_exist_where_their_paths_say(name):
    path = zarr_compat.CODEC_PIPELINE_PATHS[name]
    module, _, cls = path.rpartition(".")
    if name == "zarrs":
        pytest.importorskip("zarrs")
    try:
        pipeline = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        pytest.fail(broke("CODEC_PIPELINE_PATHS", f"{path}: {exc}"))
    assert issubclass(pipeline, CodecPipeline), broke("CODEC_PIPELINE_PATHS", f"{path} is not a CodecPipeline")
    with zarr.config.set({"codec_pipeline.path": path}):
        assert call("codec_pipeline") == name, broke("codec_pipeline")
