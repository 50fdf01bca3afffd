"""The analysis notebook runs top to bottom on a small rate sweep (simulator) plus one real-engine run."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent


def _epd_run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "epd.run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _execute_as_a_user_would(notebook: str, records: Path, out: Path) -> nbformat.NotebookNode:
    """`jupyter nbconvert --to notebook --execute notebooks/NAME.ipynb`, started from the notebooks/
    directory (the kernel's working directory), with the records pointed at by EPD_RECORDS."""
    env = {**os.environ, "EPD_RECORDS": str(records), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--output-dir", str(out), notebook]
    proc = subprocess.run(cmd, cwd=ROOT / "notebooks", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return nbformat.read(out / notebook, as_version=4)


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_analysis_notebook_runs_as_shipped(tmp_path):
    records = tmp_path / "records"
    _epd_run(["-m", "backend=sim", "logger=none", "deployment=epd,pd", "workload.rate=1,4", "workload.num_requests=8",
              f"hydra.sweep.dir={records}/sweep"], tmp_path)  # fmt: skip
    offline = ["backend=sim", "logger=none", "workload.name=burst", "workload.arrival=offline", f"hydra.run.dir={records}/offline"]
    _epd_run(offline, tmp_path)
    nb = _execute_as_a_user_would("analysis.ipynb", records, tmp_path / "out")
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 3
    text = "".join(o.get("text", "") for o in outputs)
    assert "5 records" in text and "3 configurations" in text  # the offline run of another workload is its own


def test_compare_notebook_runs_as_shipped(tmp_path):
    records = tmp_path / "records"
    _epd_run(
        ["+experiment=compare_tiny", "compare.real=false", "logger=none", "compare.rates=[1,3,6]", f"hydra.run.dir={records}/cmp"], tmp_path
    )
    nb = _execute_as_a_user_would("compare.ipynb", records, tmp_path / "out")
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 2  # attainment, goodput (no engine rows: no scatter)
    assert "1 comparisons" in "".join(o.get("text", "") for o in outputs)
    # the offline report of the same records: Markdown with its plots beside it
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "epd.report", str(records)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (records / "report" / "report.md").read_text()
    assert "# Comparison: compare_tiny" in report and "![Goodput](compare0_goodput.png)" in report
    assert (records / "report" / "compare0_goodput.png").stat().st_size > 0 and "| compare_tiny |" in report


def test_records_are_found_from_the_checkout_wherever_the_kernel_starts(tmp_path, monkeypatch):
    from epd.analysis import REPO, record_roots

    monkeypatch.delenv("EPD_RECORDS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert record_roots() == [REPO / "multirun", REPO / "outputs"] and (REPO / "conf").is_dir()
    monkeypatch.setenv("EPD_RECORDS", str(tmp_path))
    assert record_roots() == [tmp_path.resolve()] and record_roots(tmp_path / "x") == [(tmp_path / "x").resolve()]


def test_wilson_interval():
    from epd.analysis import wilson

    low, high = wilson(9, 10)
    assert 0.59 < low < 0.6 and 0.98 < high < 0.99
    assert wilson(0, 0) == (0.0, 1.0) and wilson(10, 10)[1] == 1.0


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


def test_wandb_report_of_an_experiment(tmp_path):
    """The online report is built from the experiment's runs; saving it needs a login, and without one
    the command says so (and where the offline report is)."""
    from epd.report import wandb_report

    report = wandb_report("compare_tiny", "epd", "someone")
    grid = report.blocks[-1]
    assert report.title == "EPD: compare_tiny" and len(grid.panels) == 4 and grid.runsets[0].groupby == ["deployment.name"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": ""}
    proc = subprocess.run([sys.executable, "-m", "epd.report", "--wandb", "compare_tiny", "--entity", "someone"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "needs W&B online and a login" in proc.stderr and "Traceback" not in proc.stderr
