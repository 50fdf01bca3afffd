"""Run records (files in the Hydra output dir) and Weights & Biases logging, both from the driver only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from epd.config import LoggerConfig
from epd.metrics import stage_times
from epd.run_result import RunResult

log = logging.getLogger(__name__)


def request_rows(result: RunResult) -> list[dict[str, Any]]:
    rows = []
    for rid, tl in sorted(result.timelines().items()):
        row = {
            "request_id": rid,
            "status": "finished" if tl.finished else ("aborted" if tl.abort_reason is not None else "unfinished"),
            "ttft": tl.ttft,
            "tpot": tl.tpot,
            "e2e": tl.e2e,
            "num_output_tokens": tl.num_output_tokens,
            "abort_reason": tl.abort_reason,
        }
        row.update(stage_times(tl))
        rows.append(row)
    return rows


def write_record(out_dir: Path, resolved: dict, result: RunResult, summary: dict) -> None:
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    result.events.write_jsonl(out_dir / "events.jsonl")
    with open(out_dir / "outputs.jsonl", "w") as f:
        for rid, out in sorted(result.outputs.items()):
            f.write(
                json.dumps(
                    {
                        "request_id": rid,
                        "token_ids": out.token_ids,
                        "text": out.text,
                        "finish_reason": out.finish_reason,
                        "abort_reason": out.abort_reason,
                        "prompt_tokens": out.prompt_tokens,
                    }
                )
                + "\n"
            )
    with open(out_dir / "requests.jsonl", "w") as f:
        for row in request_rows(result):
            f.write(json.dumps(row) + "\n")
    with open(out_dir / "timeseries.jsonl", "w") as f:
        for row in result.timeseries:
            f.write(json.dumps(row) + "\n")
    if result.stage_load:
        with open(out_dir / "stage_load.jsonl", "w") as f:
            for row in result.stage_load:
                f.write(json.dumps(row) + "\n")
    if result.batches:
        with open(out_dir / "batches.jsonl", "w") as f:
            for row in result.batches:
                f.write(json.dumps(row) + "\n")
    (out_dir / "workers.json").write_text(json.dumps(result.workers, indent=2))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


class WandbLogger:
    def __init__(self, cfg: LoggerConfig, out_dir: Path, name: str, group: str, tags: list[str], config: dict):
        import wandb

        self.wandb = wandb
        # W&B's own lines go to its files in the run directory, not the terminal: one line says where.
        self.run = wandb.init(
            project=cfg.project,
            dir=str(out_dir),
            mode=cfg.mode,
            name=name,
            group=cfg.group or group,
            tags=tags,
            config=config,
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off"),
        )
        if cfg.mode == "offline":
            where = Path(self.run.dir).parent
            print(f"  W&B        offline run {where} (upload: wandb sync {where})", flush=True)
        elif getattr(self.run, "url", None):
            print(f"  W&B        {self.run.url}", flush=True)

    def log_run(self, summary: dict, result: RunResult) -> None:
        rows = request_rows(result)
        if rows:
            cols = list(rows[0].keys() | set().union(*(r.keys() for r in rows)))
            table = self.wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
            self.run.log({"requests": table})
        by_time: dict[float, dict] = {}
        for row in result.timeseries:
            point = by_time.setdefault(row["time"], {"time": row["time"]})
            for key in ("encode_queue", "prefill_queue", "decode_queue", "running", "kv_usage", "mm_usage", "busy"):
                point[f"{row['instance']}/{key}"] = row[key]
        for row in result.stage_load:
            point = by_time.setdefault(row["time"], {"time": row["time"]})
            for key in ("instances", "waiting", "running", "bridge", "kv_usage", "mm_usage", "busy", "pressure"):
                point[f"stage/{row['stage']}/{key}"] = row[key]
        for point in sorted(by_time.values(), key=lambda p: p["time"]):
            self.run.log(point)
        for k, v in summary.items():
            self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class NullLogger:
    def log_run(self, summary: dict, result: RunResult) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def make_logger(cfg: LoggerConfig, out_dir: Path, name: str, group: str, tags: list[str], config: dict) -> Optional[Any]:
    if cfg.kind == "none":
        return NullLogger()
    if cfg.kind == "wandb":
        return WandbLogger(cfg, out_dir, name, group, tags, config)
    raise ValueError(f"unknown logger.kind {cfg.kind!r} (wandb, none)")
