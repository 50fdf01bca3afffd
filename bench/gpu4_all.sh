#!/usr/bin/env bash
# Everything the 4-GPU experiments need, in one device call (about 9 minutes on 4 x H200):
#   . .device/setup.sh && bash bench/gpu4_all.sh "$OUT"
# Builds the csrc extension first, with no time limit: a build killed half-way costs the next one
# its wait (the flock makes that safe, but the time is still lost). Outputs stay few and small.
set -u
OUT=${1:?output directory}
export RAY_AUTH_MODE=disabled
HW=$(python3 -c "import torch; print('h200' if 'H200' in torch.cuda.get_device_name(0) else 'h100')")
echo "hardware=$HW"
python3 -c "from epd.csrc import block_ops; m = block_ops(); print('csrc cuda:', bool(m and m.has_cuda()))"
mkdir -p "$OUT"
timeout 120 python3 bench/multi_gpu.py --out "$OUT/mg" --parts p2p engine 2>&1 | grep -E "GBps|identical|error" | head -40
for exp in "paper_e2e_4gpu compare.rates=[2.0,3.0,4.0]" "paper_e2e_4gpu model=llava-1.5-7b slo=minicpmv_4img workload.images_per_request_max=6 compare.rates=[2.0,4.0,6.0]" "role_switching_gpu4"; do
  name=$(echo "$exp" | tr ' =[],.' '_______' | cut -c1-60)
  timeout 200 python3 -m epd.run +experiment=$exp hardware=$HW logger=none hydra.run.dir="/tmp/runs/$name" 2>&1 | grep -E "^\| |rror:" | tail -14
  mkdir -p "$OUT/$name" && cp /tmp/runs/$name/compare.* "$OUT/$name/" 2>/dev/null
done
(cd /tmp/runs && tar czf "$OUT/records.tgz" */runs/*/summary.json */runs/*/workers.json */runs/*/stage_load.jsonl 2>/dev/null)
