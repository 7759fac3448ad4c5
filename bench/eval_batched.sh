#!/bin/bash
# `tunejob eval --limit 20` on one demo run, before and after the one engine (issue 32), one after
# the other on a quiet machine. BEFORE_SRC is a checkout of 0f6ec1d (`git worktree add /tmp/before
# 0f6ec1d`), which answers one prompt at a time with transformers' generate(); RUN-old is a copy of
# RUN whose config.yaml files lack the keys added since (distributed.max_failures), which 0f6ec1d
# refuses. Usage: bench/eval_batched.sh RUN   (RUN: a `tunejob demo --output-dir RUN` run)
set -e
RUN=${1:?a demo run directory}
BEFORE_SRC=${BEFORE_SRC:-/tmp/before/src}
HERE=$(cd "$(dirname "$0")/.." && pwd)
DATA=$HERE/src/tunejob/resources/sales_companion.jsonl
OUT=${OUT:-/tmp/eval_batched}
mkdir -p $OUT
rm -rf $RUN-old && cp -r $RUN $RUN-old && find $RUN-old -name config.yaml -exec sed -i '/max_failures:/d; /chat_template:/d' {} \;
for round in 1; do
for side in before after; do
  src=$HERE/src; run=$RUN; [ $side = before ] && src=$BEFORE_SRC && run=$RUN-old
  s=$(date +%s.%N)
  OMP_NUM_THREADS=2 PYTHONPATH=$src $HERE/.venv/bin/python -m tunejob eval $run --limit 20 --data $DATA --json > $OUT/eval_$side$round.json 2>$OUT/eval_$side$round.err
  e=$(date +%s.%N)
  python3 - "$side" "$round" "$s" "$e" "$OUT" <<'PY'
import json, sys
side, rnd, s, e, out = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
r = json.load(open(f"{out}/eval_{side}{rnd}.json"))
m = r["models"]
print(side, rnd, f"wall {e-s:.1f} s", {k: {x: round(m[k][x], 3) if isinstance(m[k][x], float) else m[k][x] for x in ("latency_s", "tokens_per_second", "answer_tokens", "rouge_l")} for k in m})
PY
done
done
