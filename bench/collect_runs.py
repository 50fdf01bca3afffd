"""Collect the summaries and worker reports of every run record under a folder into one JSON file.

python bench/collect_runs.py RUNS_DIR OUT.json
"""

import json
import sys
from pathlib import Path

root, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = []
for summary in sorted(root.rglob("summary.json")):
    d = summary.parent
    runs.append(
        {
            "dir": str(d.relative_to(root)),
            "summary": json.loads(summary.read_text()),
            "workers": json.loads((d / "workers.json").read_text()) if (d / "workers.json").exists() else [],
        }
    )
failed = [str(p.parent.relative_to(root)) for p in root.rglob("FAILED")]
out.write_text(json.dumps({"runs": runs, "failed": failed}, indent=2))
print(f"{len(runs)} runs, {len(failed)} failed -> {out}")
