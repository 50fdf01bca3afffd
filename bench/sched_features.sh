#!/usr/bin/env bash
# The serving-grade schedulers' features one at a time, on the engine (one GPU) and in the simulator,
# the same workload (conf/experiment/sched_features.yaml, serving_mix):
#   . .device/setup.sh && bash bench/sched_features.sh "$OUT" [RATE] [N] [BACKENDS]
# BACKENDS: "ray sim" by default; VARIANT_LIST picks variants; EXTRA adds overrides to every run. On CPU:
#   HW=cpu EXTRA="model=tiny-llava workload=serving_mix_tiny slo=cpu" bash bench/sched_features.sh out 4 64 "local sim" Each run's summary goes to
# $OUT/<variant>-<backend>/summary.json (the rest of the run record is dropped); a table is printed at the end.
set -u
OUT=${1:?output directory}
RATE=${2:-8}
N=${3:-300}
BACKENDS=${4:-ray sim}
export RAY_AUTH_MODE=disabled
HW=${HW:-$(python3 -c "import torch; print(('h200' if 'H200' in torch.cuda.get_device_name(0) else 'h100') if torch.cuda.is_available() else 'cpu')")}
echo "hardware=$HW rate=$RATE requests=$N"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
mkdir -p "$OUT"
declare -A VARIANTS=(
  [all_on]=""
  [chunked_off]="deployment.chunked_prefill=false deployment.aggregated.max_prefill_tokens=8192"
  [kv_reserve]="deployment.kv_allocation=reserve"
  [encoder_cache_off]="deployment.aggregated.encoder_cache_blocks=0"
  [prefix_off]="deployment.prefix_caching=false"
  [step_graphs_off]="model.step_graph_tokens=0"
  [alternate]="deployment.prefill_decode_steps=alternate"
)
for name in ${VARIANT_LIST:-all_on chunked_off kv_reserve encoder_cache_off}; do
  for backend in $BACKENDS; do
    dir="$OUT/$name-$backend"
    t0=$SECONDS
    # shellcheck disable=SC2086
    timeout 300 python3 -m epd.run +experiment=sched_features backend=$backend hardware="$HW" logger=none \
      workload.rate="$RATE" workload.num_requests="$N" ${VARIANTS[$name]} ${EXTRA:-} hydra.run.dir="$dir" 2>&1 | grep -E "rror|requests  " | tail -3
    echo "$name $backend: $((SECONDS - t0)) s"
    find "$dir" -mindepth 1 ! -name summary.json -exec rm -rf {} + 2>/dev/null
  done
done
python3 - "$OUT" <<'PY'
import json, pathlib, sys
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    s = json.loads(p.read_text())
    rows.append((p.parent.name, s))
keys = ["request_throughput", "output_throughput", "ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "slo_attainment",
        "preemptions", "encoder_cache_hit_rate", "prefix_cache_hit_rate", "prefill_tokens_computed",
        "busy_encode_s", "busy_prefill_s", "busy_mixed_s", "busy_decode_s", "batch_mixed_mean_ms", "batch_decode_mean_ms"]
print("| run | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 1) + "|")
for name, s in rows:
    cells = [f"{s.get(k):.3g}" if isinstance(s.get(k), float) else str(s.get(k)) for k in keys]
    print(f"| {name} | " + " | ".join(cells) + " |")
PY
