"""Chaos on CPU: one worker of a 2E2P2D Ray engine (tiny LLaVA) is killed while requests run.

    HF_HUB_OFFLINE=1 python bench/chaos.py --out chaos.json

For each stage: 12 requests with images are added, one worker of that stage is killed once 3 have
their first token, 6 more requests follow once the first ones have ended. Reports how many finished,
were redone on the siblings (what the dead worker held or was doing started over), were aborted (with
a reason naming the lost worker) or were lost (must be 0), and how long the engine took to notice the
loss, how long its replacement took to start and rejoin (`deployment.replace_lost_workers`), and how
many of the later requests it served. The same scenario as tests/test_faults.py, with its counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import MODEL  # noqa: E402
from test_faults import TWO_OF_EACH, _requests  # noqa: E402

from epd.config import BackendConfig, EngineConfig  # noqa: E402
from epd.engine.core import EngineCore  # noqa: E402
from epd.lifetime import LifetimeEvent as Ev  # noqa: E402


def one(victim: str) -> dict:
    import ray

    reqs, later = _requests("a", 12), _requests("b", 6)
    core = EngineCore(EngineConfig(MODEL, TWO_OF_EACH, "ray", BackendConfig()))
    try:
        for r in reqs:
            core.add_request(r)
        while sum(1 for e in core.pipeline.events if e.kind == Ev.FIRST_TOKEN) < 3:
            core.step()
        killed = time.time()
        ray.kill(core.executor.actors[victim][0], no_restart=True)
        while not core.pipeline.instances[victim].failed and time.time() - killed < 30:
            core.step()
        noticed = time.time() - killed
        core.run_until_idle(120)
        while not any(e.kind == Ev.WORKER_REPLACED for e in core.pipeline.events) and time.time() - killed < 120:
            core.step()  # the replacement loads the model while the siblings serve
        replaced = next((e for e in core.pipeline.events if e.kind == Ev.WORKER_REPLACED), None)
        for r in later:
            core.add_request(r)
        core.run_until_idle(120)
        outs = core.pipeline.outputs
        aborted = [o for o in outs.values() if o.finish_reason == "abort"]
        after = [e for e in core.pipeline.events if replaced is not None and e.time > replaced.time]
        served = {e.request_id for e in after if e.instance == victim and e.request_id}
        tokens = [e.time for e in core.pipeline.events if e.kind in (Ev.FIRST_TOKEN, Ev.TOKEN)]
        kill_t = killed - core.origin
        first_done = max(e.time for e in core.pipeline.events if e.kind in (Ev.FINISHED, Ev.ABORTED) and e.request_id.startswith("a"))
        back_t = min(replaced.time if replaced is not None else first_done, first_done)  # while the first requests still ran

        def rate(lo: float, hi: float) -> float | None:  # output tokens per second in [lo, hi)
            return sum(lo <= t < hi for t in tokens) / (hi - lo) if hi > lo else None

        return {
            "victim": victim,
            "requests": len(reqs) + len(later),
            "ended": len(outs),
            "finished": len(outs) - len(aborted),
            "aborted": len(aborted),
            "aborts_naming_the_victim": sum(victim in o.abort_reason for o in aborted),
            "redone": sum(1 for e in core.pipeline.events if e.kind == Ev.PREEMPTED and e.data.get("cause") == "worker_lost"),
            "lost": len(reqs) + len(later) - len(outs),
            "noticed_after_s": noticed,
            "replaced_after_s": None if replaced is None else replaced.data["took_s"],
            "requests_served_by_the_replacement": len(served),
            "tokens_per_s_before_the_loss": rate(min(tokens), kill_t),
            "tokens_per_s_while_replacing": rate(kill_t, back_t),
        }
    finally:
        core.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="chaos.json")
    args = ap.parse_args()
    rows = []
    for victim in ("encode-1", "prefill-1", "decode-1"):
        rows.append(one(victim))
        r = rows[-1]
        print(
            f"{victim}: {r['ended']} of {r['requests']} ended, {r['finished']} finished ({r['redone']} redone), {r['aborted']} aborted "
            f"({r['aborts_naming_the_victim']} naming it), {r['lost']} lost; loss noticed after {r['noticed_after_s']:.2f} s; "
            f"replacement up after {r['replaced_after_s']} s, then served {r['requests_served_by_the_replacement']} requests; "
            f"tokens/s before {r['tokens_per_s_before_the_loss']}, while replacing {r['tokens_per_s_while_replacing']}",
            flush=True,
        )
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
