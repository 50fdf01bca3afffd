"""The analysis notebook runs top to bottom on a small rate sweep (simulator) plus one real-engine run."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def test_analysis_notebook_executes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    sweep = subprocess.run(
        [
            sys.executable,
            "-m",
            "epd.run",
            "-m",
            "backend=sim",
            "logger=none",
            "deployment=epd,pd",
            "workload.rate=1,4",
            "workload.num_requests=8",
            f"hydra.sweep.dir={tmp_path}/records",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["EPD_RECORDS"] = str(tmp_path / "records")
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        os.environ.pop("EPD_RECORDS")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3
    assert "4 records" in "".join(o.get("text", "") for o in outputs)


def test_analysis_helpers_on_records(tmp_path):
    from epd.analysis import attainment_table, find_records, plot_timeline

    proc = subprocess.run(
        [sys.executable, "-m", "epd.run", "backend=sim", "logger=none", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = find_records(tmp_path)
    assert len(recs) == 1 and len(attainment_table(recs)) == 1
    fig = plot_timeline(recs[0])
    assert len(fig.axes[0].patches) >= 16 * 3  # encode, transfer(s), prefill, decode bars for every request
