"""Scoring on a Dask cluster (pipeline/score/cluster.py): a real LocalCluster of worker processes, and a
`dask scheduler` + `dask worker` pair on loopback reading a local store and a store on the S3 server, give
the threaded path's selection; scores are written once per key when jobs race."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import H2TError
from pipeline.rows import kfold
from pipeline.score import SOLVERS, ScoreRuntime, open_matrix, score_store
from pipeline.score import cluster as cluster_module
from pipeline.score.cluster import ClusterMatrix, _forget
from pipeline.score.datafit import MultinomialLogistic
from pipeline.score.matrix import FeatureMatrix
from pipeline.select import kept, ranking
from pipeline.storage.claims import Claims
from pipeline.storage.store import create_store, open_store
from tests.conftest import make_store, score_cfg
from tests.s3server import BUCKET, KEY, SECRET, S3Server

WIDTHS = [40, 24, 64, 8]
STREAMED = 0.05  # MB: blocks of a few shards, so every pass is several tasks


@pytest.fixture(scope="module")
def local2():
    """One runtime for the module's solves on a LocalCluster of 2 processes (as a command holds one)."""
    with ScoreRuntime() as runtime:
        yield runtime


@pytest.fixture
def data(rng):
    n = {"train": 300, "val": 60, "test": 40}
    X = {s: np.abs(rng.standard_normal((m, sum(WIDTHS)))).astype(np.float32) for s, m in n.items()}
    y = {s: (x[:, 3] + x[:, 50] > x[:, 70] + x[:, 100]).astype(np.int64) + (x[:, 5] > 1) for s, x in X.items()}
    return X, y


def twin_stores(tmp_path, data):
    X, y = data
    return [make_store(tmp_path / f"{name}.zarr", X, y, 3, dtype="float16", spec={"widths": WIDTHS})
            for name in ("threads", "cluster")]


def assert_same_selection(a: dict, b: dict, fraction: float = 0.1) -> None:
    k = kept(len(a["weight_sq"]), fraction)
    top_a = set(ranking(a["weight_sq"], a["grad_norm"])[:k])
    top_b = set(ranking(b["weight_sq"], b["grad_norm"])[:k])
    assert top_a == top_b
    np.testing.assert_array_equal(a["weight_sq"] > 0, b["weight_sq"] > 0)
    np.testing.assert_allclose(a["weight_sq"], b["weight_sq"], rtol=1e-3, atol=1e-6 * a["weight_sq"].max())


def test_a_local_cluster_of_processes_scores_like_the_threaded_path(tmp_path, data, local2):
    threads, cluster = twin_stores(tmp_path, data)
    fit, _ = kfold(threads, ["train", "val"], 3)[1]
    for rows in ("train", fit):
        mine, info = score_store(threads, score_cfg(lam=3e-3, memory_budget_mb=STREAMED), rows)
        theirs, info_c = score_store(cluster, score_cfg(lam=3e-3, memory_budget_mb=STREAMED, cluster="local:2"), rows,
                                     runtime=local2)
        assert not info["in_memory"] and info_c["key"] == info["key"]  # the cache key ignores where it ran
        assert_same_selection(mine, theirs)
    client = local2.client("local:2")
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 2 and len({w["id"] for w in workers.values()}) == 2
    # the power iteration (FISTA's step size) as a cluster reduction
    budget = int(STREAMED * 2**20)
    with FeatureMatrix(threads, "train", budget) as local, ClusterMatrix(cluster, "train", client, budget) as remote:
        assert len(remote.segments) > 2 and len(set(remote.placement)) == 2
        assert MultinomialLogistic.lipschitz(remote, iterations=10) == pytest.approx(
            MultinomialLogistic.lipschitz(local, iterations=10), rel=1e-5)


def test_closing_a_cluster_matrix_releases_its_worker_caches(tmp_path, data, local2):
    _, store = twin_stores(tmp_path, data)
    settings = score_cfg(memory_budget_mb=STREAMED, cluster="local:2")
    client = local2.client("local:2")
    other = open_matrix(store, "train", settings, local2)
    with open_matrix(store, "train", settings, local2) as matrix:
        assert isinstance(matrix, ClusterMatrix)
        matrix.columns(np.array([0, 50, 130]))
    assert set(client.run(_forget, matrix.token).values()) == {0}  # nothing of it left on any worker
    held = client.run(_forget, other.token)  # the open one's store and block norms were there
    assert len(held) == 2 and all(n > 0 for n in held.values())
    other.close()


def test_a_failed_solve_releases_the_worker_caches(tmp_path, data, local2, monkeypatch):
    _, store = twin_stores(tmp_path, data)
    seen = []

    class Failing:
        def __init__(self, **_settings):
            pass

        def solve(self, matrix, datafit, penalty, W0=None, b0=None):
            seen.append(matrix)
            raise RuntimeError("the solve failed")

    monkeypatch.setitem(SOLVERS, "working_set", Failing)
    with pytest.raises(RuntimeError, match="the solve failed"):
        score_store(store, score_cfg(memory_budget_mb=STREAMED, cluster="local:2"), "train", runtime=local2)
    assert set(local2.client("local:2").run(_forget, seen[0].token).values()) == {0}
    assert not local2.closed  # the caller's runtime: its owner closes it


def test_the_runtime_opens_one_client_per_spec_and_closes_them(monkeypatch):
    started = []
    start = cluster_module._start_local
    monkeypatch.setattr(cluster_module, "_start_local", lambda spec: started.append(spec) or start(spec))
    with ScoreRuntime() as runtime:
        assert runtime.client(None) is None and runtime.client("null") is None and not started
        client = runtime.client("local:1")
        assert runtime.client("local:1") is client and started == ["local:1"] and runtime.specs == ["local:1"]
        assert client.status == "running"
        cluster = client.cluster
    assert runtime.closed and runtime.specs == []
    assert client.status == "closed" and cluster.status.name == "closed"
    with pytest.raises(H2TError, match="closed"):
        runtime.client("local:1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes on loopback, as a user would start them."""
    dask_cli = str(Path(sys.executable).parent / "dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("dask")
    procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=open(logs / "scheduler.log", "w"), stderr=subprocess.STDOUT)]
    time.sleep(1.0)
    procs.append(subprocess.Popen([dask_cli, "worker", address, "--nworkers", "2", "--nthreads", "1",
                                   "--no-dashboard", "--local-directory", str(logs)],
                                  stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"}))
    from distributed import Client  # optional dependency: only `score.cluster` needs it

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with Client(address, timeout=5) as client:
                if len(client.scheduler_info()["workers"]) == 2:
                    break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        raise RuntimeError(f"dask workers did not join: {(logs / 'worker.log').read_text()[-2000:]}")
    yield address
    for proc in reversed(procs):
        proc.terminate()
        proc.wait(timeout=30)


def test_scheduler_and_workers_on_loopback_score_a_local_store(tmp_path, data, scheduler):
    threads, cluster = twin_stores(tmp_path, data)
    mine, _ = score_store(threads, score_cfg(lam=3e-3, memory_budget_mb=STREAMED), "train")
    theirs, info = score_store(cluster, score_cfg(lam=3e-3, memory_budget_mb=STREAMED, cluster=scheduler), "train")
    assert_same_selection(mine, theirs)
    assert info["passes"] >= 2


def test_scheduler_and_workers_score_a_store_on_the_s3_server(tmp_path, data, scheduler, local2):
    (tmp_path / "seaweed").mkdir()
    server = S3Server(tmp_path / "seaweed").start()
    try:
        X, y = data
        options = {"endpoint_url": server.endpoint, "key": KEY, "secret": SECRET}
        remote_path = f"s3://{BUCKET}/cluster/s.zarr"
        layers, offset = [], 0
        for i, w in enumerate(WIDTHS):
            layers.append({"name": f"layer{i}", "role": "test", "raw_shape": [w], "dim": w, "offset": offset})
            offset += w
        remote = create_store(remote_path, {"model": {"name": "synthetic"}, "dataset": {"name": "synthetic"}}, layers,
                              {s: len(v) for s, v in y.items()}, 3, ["0", "1", "2"], 16, "float16", 64, "lz4",
                              options=options)
        for split, values in X.items():
            remote.group[f"{split}/labels"][:] = y[split]
            remote.group[f"{split}/sample_ids"][:] = np.array([str(i) for i in range(len(values))])
            for start in range(0, len(values), 16):
                rows = values[start:start + 16]
                remote.write_rows(split, start, [remote.encode(l["name"], rows[:, l["offset"]:l["offset"] + l["dim"]])
                                                 for l in layers])
        remote.mark_complete()
        remote = open_store(remote_path, options=options)
        local, _ = twin_stores(tmp_path, data)
        mine, _ = score_store(local, score_cfg(lam=3e-3, memory_budget_mb=STREAMED), "train")
        theirs, info = score_store(remote, score_cfg(lam=3e-3, memory_budget_mb=STREAMED, cluster=scheduler), "train")
        assert_same_selection(mine, theirs)
        assert remote.load_relevance(info["key"]) is not None  # the driver wrote the scores into the s3 store
        for key in list(remote.group["derived/relevance"].group_keys()):
            del remote.group[f"derived/relevance/{key}"]  # solve again, on a LocalCluster of processes
        local_cluster, again = score_store(remote, score_cfg(lam=3e-3, memory_budget_mb=STREAMED, cluster="local:2"),
                                           "train", runtime=local2)
        assert not again["cached"]
        assert_same_selection(mine, local_cluster)
    finally:
        server.stop()


def test_scores_are_written_once_per_key_when_jobs_race(tmp_path, data):
    store, _ = twin_stores(tmp_path, data)
    arrays = {"weight_sq": np.ones(sum(WIDTHS), np.float32), "grad_norm": np.zeros(sum(WIDTHS), np.float32)}
    other = Claims(store.group.store, ttl_s=60)
    assert other.try_claim("relevance/k1")  # another job is writing k1 right now
    store.save_relevance("k1", arrays, {"params": {}, "solution": {"by": "loser"}})
    assert store.load_relevance("k1") is None  # the loser wrote nothing
    other.release("relevance/k1")
    store.save_relevance("k1", arrays, {"params": {}, "solution": {"by": "first"}})
    store.save_relevance("k1", {k: v * 2 for k, v in arrays.items()}, {"params": {}, "solution": {"by": "second"}})
    loaded, attrs = store.load_relevance("k1")
    assert attrs["solution"]["by"] == "first" and loaded["weight_sq"][0] == 1.0  # committed scores never rewritten


@pytest.mark.parametrize("spec,culprit", [("local:0", "N >= 1"), ("yarn", "null, local:N or tcp://")])
def test_bad_cluster_specs_are_one_line(spec, culprit):
    with ScoreRuntime() as runtime, pytest.raises(H2TError, match=culprit):
        runtime.client(spec)


def test_an_unreachable_scheduler_is_one_line():
    with ScoreRuntime() as runtime, pytest.raises(H2TError, match="no Dask scheduler answers"):
        runtime.client(f"tcp://127.0.0.1:{_free_port()}")
