"""Per-stage load signals from the pipeline, smoothed over time.

For each stage (encode, prefill, decode), over the instances serving it now: work waiting in its
queues, sequences running, outputs waiting in the bridge to the next stage, KV/MM block usage and
the fraction of time its workers were busy. `pressure` folds these into one number per stage:
batches of waiting work per worker, plus how busy the workers are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from epd.config import ROLES, Role
from epd.stages.pipeline import Pipeline

STAGES = ROLES  # the single-role pools, named as their roles


@dataclass
class StageLoad:
    stage: str
    instances: int = 0
    waiting: float = 0.0  # encode: images; prefill: prompt tokens; decode: sequences (queued + running)
    running: float = 0.0
    bridge: float = 0.0  # outputs sent and not yet pulled by the next stage
    kv_usage: float = 0.0
    mm_usage: float = 0.0
    busy: float = 0.0  # fraction of workers busy, smoothed
    pressure: float = 0.0

    def row(self, t: float) -> dict:
        return {"time": t, **asdict(self)}


def _instant(pipe: Pipeline, stage: str) -> StageLoad:
    insts = pipe.active(stage)
    load = StageLoad(stage, len(insts))
    if not insts:
        return load
    n = len(insts)
    if stage == Role.ENCODE:
        load.waiting = sum(len(i.encode_queue) for i in insts)
        capacity = n * max(i.cfg.max_images_per_batch for i in insts)
    elif stage == Role.PREFILL:
        load.waiting = sum(s.prompt_len for i in insts for s in i.prefill_queue if not s.done)
        capacity = n * max(i.cfg.max_prefill_tokens for i in insts)
    else:
        load.waiting = sum(len(i.decode_queue) + len(i.running) for i in insts)
        capacity = n * max(i.cfg.max_decode_seqs for i in insts)
    load.running = sum(len(i.running) for i in insts)
    load.bridge = sum(i.outgoing for i in insts)
    load.kv_usage = sum(i.kv_usage for i in insts) / n
    load.mm_usage = sum(i.mm_usage for i in insts) / n
    load.busy = sum(1 for i in insts if i.busy) / n
    load.pressure = load.waiting / capacity + load.busy
    return load


class LoadEstimator:
    """Exponentially smoothed stage loads; `alpha` is the weight of the newest sample."""

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self.loads: dict[str, StageLoad] = {s: StageLoad(s) for s in STAGES}
        self.history: list[dict] = []

    def observe(self, pipe: Pipeline, t: float) -> dict[str, StageLoad]:
        for stage in STAGES:
            new, old = _instant(pipe, stage), self.loads[stage]
            a = self.alpha
            for f in ("waiting", "running", "bridge", "kv_usage", "mm_usage", "busy", "pressure"):
                setattr(new, f, a * getattr(new, f) + (1 - a) * getattr(old, f))
            self.loads[stage] = new
            self.history.append(new.row(t))
        return self.loads
