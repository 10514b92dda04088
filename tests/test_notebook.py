"""notebooks/explore_store.ipynb runs top to bottom on a store that has been probed."""
import json
import os
import subprocess
import sys
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_store.ipynb"
TINY = ["model=resnet_tiny", "data=shapes_location", "data.num_classes=4", "data.image_size=32",
        "data.sizes.train=64", "data.sizes.val=16", "data.sizes.test=32", "pooling.target_size=128",
        "extract.progress=false", "score.max_iter=20", "head.steps=50"]


def test_notebook_code_cells_run_on_a_probed_store(tmp_path):
    root = tmp_path / "stores"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "H2T_STORE_ROOT": str(root)}
    ran = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", *TINY, f"store.root={root}",
                          f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    code = "\n".join("".join(c["source"]) for c in cells) + "\nprint('shape', X.shape, X.dtype)\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "'lam': 0.001" in done.stdout and "shape (8, " in done.stdout and "float16" in done.stdout
