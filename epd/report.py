"""`python -m epd.report [DIR] [--out OUT]`: a Markdown report of the run records under DIR (default: the
checkout's multirun/ and outputs/, or $EPD_RECORDS) with its plots as PNG files beside it: one table of
every run, attainment vs rate per configuration with 95% bands, latency CDFs, and for each comparison
experiment its attainment, goodput and simulator-vs-engine plots.

`python -m epd.report --wandb EXPERIMENT [--project P] [--entity E]`: the same questions as a W&B Report
over the experiment's runs in a W&B project (online, logged in; built with `wandb-workspaces`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")

from epd import analysis  # noqa: E402


def markdown_table(frame) -> str:
    def cell(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    head = "| " + " | ".join(frame.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, "|" + "---|" * len(frame.columns), *rows])


def write_report(root, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    records, compares = analysis.find_records(root), analysis.find_compares(root)
    if not records and not compares:
        raise SystemExit(f"no run records under {', '.join(map(str, analysis.record_roots(root)))}")
    lines = [
        "# EPD report",
        "",
        f"{len(records)} runs, {len(compares)} comparisons, from {', '.join(map(str, analysis.record_roots(root)))}.",
        "",
    ]

    def figure(fig, name: str, title: str) -> None:
        fig.savefig(out / name, dpi=110)
        matplotlib.pyplot.close(fig)
        lines.extend([f"## {title}", "", f"![{title}]({name})", ""])

    if records:
        table = analysis.attainment_table(records)
        lines += ["## Runs", "", markdown_table(table), ""]
        figure(analysis.plot_attainment_vs_rate(records), "attainment.png", "SLO attainment vs rate")
        figure(analysis.plot_cdfs(records), "latency_cdfs.png", "TTFT and TPOT distributions")
    for i, (path, result) in enumerate(compares):
        lines += [f"# Comparison: {result['experiment']} ({path})", ""]
        figure(analysis.plot_compare_attainment(result), f"compare{i}_attainment.png", "Attainment vs rate")
        figure(analysis.plot_goodput(result), f"compare{i}_goodput.png", "Goodput")
        if {r["source"] for r in result["rows"]} >= {"engine", "simulator"}:
            figure(analysis.plot_sim_vs_engine(result), f"compare{i}_sim_vs_engine.png", "Simulator vs engine")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def wandb_report(experiment: str, project: str = "epd", entity: Optional[str] = None):
    """A W&B Report (not yet saved) of the runs of `experiment` in `project`: SLO attainment, TTFT and
    TPOT p90 against the rate, one series per deployment, and throughput per deployment."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    runs = wr.Runset(
        entity=entity or "",
        project=project,
        name=experiment,
        filters=[expr.Config("experiment") == experiment],
        groupby=["deployment.name"],
    )
    rate = wr.Config("workload.rate")
    panels = [
        wr.ScatterPlot(title="SLO attainment vs rate", x=rate, y=wr.SummaryMetric("slo_attainment")),
        wr.ScatterPlot(title="TTFT p90 (s) vs rate", x=rate, y=wr.SummaryMetric("ttft_p90")),
        wr.ScatterPlot(title="TPOT p90 (s) vs rate", x=rate, y=wr.SummaryMetric("tpot_p90")),
        wr.BarPlot(title="throughput (req/s)", metrics=[wr.SummaryMetric("request_throughput")], groupby=wr.Config("deployment.name")),
    ]
    blocks = [
        wr.H1(f"EPD: {experiment}"),
        wr.P("Runs of the experiment grouped by deployment; each point is one run (a rate of a sweep)."),
        wr.PanelGrid(runsets=[runs], panels=panels),
    ]
    kwargs = {"entity": entity} if entity else {}
    return wr.Report(
        project=project, title=f"EPD: {experiment}", description="made by python -m epd.report --wandb", blocks=blocks, **kwargs
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default=None, help="records to report on (default: $EPD_RECORDS, else multirun/ and outputs/)")
    ap.add_argument("--out", default=None, help="where report.md and its plots go (default: ROOT/report, or ./report)")
    ap.add_argument("--wandb", metavar="EXPERIMENT", default=None, help="build a W&B Report of this experiment's runs instead (online)")
    ap.add_argument("--project", default="epd")
    ap.add_argument("--entity", default=None)
    args = ap.parse_args()
    if args.wandb:
        try:
            report = wandb_report(args.wandb, args.project, args.entity)
            report.save()
        except Exception as exc:  # no login, no network, offline mode
            raise SystemExit(f"epd.report: the W&B report needs W&B online and a login (wandb login): {exc}\n"
                             f"The offline report: python -m epd.report DIR") from None  # fmt: skip
        print(f"report: {report.url}")
        return
    out = Path(args.out) if args.out else (Path(args.root) / "report" if args.root else Path("report"))
    print(f"report: {write_report(args.root, out)}")


if __name__ == "__main__":
    main()
