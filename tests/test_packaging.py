"""The package as users install it: a wheel built from the repo carries its configs, and the installed
`h2t` composes them from wherever it runs."""
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_carries_every_config_and_its_h2t_finds_them(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("h2t-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.removeprefix("pipeline/conf/") for n in names if n.startswith("pipeline/conf/") and n.endswith(".yaml"))
    source = sorted(str(p.relative_to(REPO / "pipeline" / "conf")) for p in (REPO / "pipeline" / "conf").rglob("*.yaml"))
    assert shipped == source and "probe.yaml" in shipped and "hydra/launcher/parallel.yaml" in shipped
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": str(Path(sys.executable).parent)}
    where = subprocess.run([sys.executable, "-c", "import pipeline.cli as c; print(c.__file__); print(c.CONF_DIR)"],
                           cwd=work, env=env, capture_output=True, text=True)
    module, conf = where.stdout.split()
    assert module.startswith(str(site)) and conf == str(site / "pipeline" / "conf")
    plan = subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", "extract.plan_only=true", "model=resnet_tiny",
                           "data=shapes_count", "data.image_size=32", "data.sizes.train=8", "data.sizes.val=0",
                           "data.sizes.test=8", f"store.root={work / 'stores'}"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    assert "plan:" in plan.stdout and "resnet10t" in plan.stdout
