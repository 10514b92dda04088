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
from pipeline.score import score_store
from pipeline.score.cluster import client_for, close_client
from pipeline.select import kept, ranking
from pipeline.storage.store import open_store
from tests.conftest import make_store, score_cfg

WIDTHS = [40, 24, 64, 8]
STREAMED = 0.05  # MB: blocks of a few shards, so every pass is several tasks


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


def test_a_local_cluster_of_processes_scores_like_the_threaded_path(tmp_path, data):
    from pipeline.score.cluster import ClusterMatrix
    from pipeline.score.datafit import MultinomialLogistic
    from pipeline.score.matrix import FeatureMatrix

    threads, cluster = twin_stores(tmp_path, data)
    fit, _ = kfold(threads, ["train", "val"], 3)[1]
    for rows in ("train", fit):
        mine, info = score_store(threads, score_cfg(lam=3e-3, memory_budget_mb=STREAMED), rows)
        theirs, info_c = score_store(cluster, score_cfg(lam=3e-3, memory_budget_mb=STREAMED, cluster="local:2"), rows)
        assert not info["in_memory"] and info_c["key"] == info["key"]  # the cache key ignores where it ran
        assert_same_selection(mine, theirs)
    client = client_for("local:2")
    workers = client.scheduler_info()["workers"]
    assert len(workers) == 2 and len({w["id"] for w in workers.values()}) == 2
    # the power iteration (FISTA's step size) as a cluster reduction
    budget = int(STREAMED * 2**20)
    local, remote = FeatureMatrix(threads, "train", budget), ClusterMatrix(cluster, "train", client, budget)
    assert len(remote.segments) > 2 and len(set(remote.placement)) == 2
    assert MultinomialLogistic.lipschitz(remote, iterations=10) == pytest.approx(
        MultinomialLogistic.lipschitz(local, iterations=10), rel=1e-5)
    remote.close()
    close_client("local:2")


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
    from distributed import Client

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
    close_client(address)
    for proc in reversed(procs):
        proc.terminate()
        proc.wait(timeout=30)


def test_scheduler_and_workers_on_loopback_score_a_local_store(tmp_path, data, scheduler):
    threads, cluster = twin_stores(tmp_path, data)
    mine, _ = score_store(threads, score_cfg(lam=3e-3, memory_budget_mb=STREAMED), "train")
    theirs, info = score_store(cluster, score_cfg(lam=3e-3, memory_budget_mb=STREAMED, cluster=scheduler), "train")
    assert_same_selection(mine, theirs)
    assert info["passes"] >= 2


def test_scheduler_and_workers_score_a_store_on_the_s3_server(tmp_path, data, scheduler):
    from tests.s3server import BUCKET, KEY, SECRET, S3Server

    (tmp_path / "seaweed").mkdir()
    server = S3Server(tmp_path / "seaweed").start()
    try:
        X, y = data
        options = {"endpoint_url": server.endpoint, "key": KEY, "secret": SECRET}
        from pipeline.storage.store import create_store

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
                                           "train")
        assert not again["cached"]
        assert_same_selection(mine, local_cluster)
        close_client("local:2")
    finally:
        server.stop()


def test_scores_are_written_once_per_key_when_jobs_race(tmp_path, data):
    from pipeline.storage.claims import Claims

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
    with pytest.raises(H2TError, match=culprit):
        client_for(spec)


def test_an_unreachable_scheduler_is_one_line():
    with pytest.raises(H2TError, match="no Dask scheduler answers"):
        client_for(f"tcp://127.0.0.1:{_free_port()}")
