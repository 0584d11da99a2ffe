#!/usr/bin/env bash
# The GPU checks, one script for a machine with a GPU and the stack importable (run from the
# repo root; results land in bench/results/*-gpu.*, logs in OUT, a temp dir unless set):
#   1. each purification pass's start-up, steady rate and the model's forward rate, 50k rows;
#   2. stage 1 of the `paper` preset on AR-poisoned CIFAR-10 (45k rows, 40 epochs): how much
#      of a sample-wise poison P1 keeps at full scale (bench/stage1_probe.py);
#   3. the `paper` preset end to end with 2 epochs per stage: start-up vs work on a GPU
#      (it logs to MLflow like any purification, so mlflow must be importable);
#   4. part 1's batch-256 passes with Ray Data's per-operator resource reservation off
#      (on 2 cores it held an unfused write's encoding to about one CPU);
#   5. NTGA's crafting on the GPU (its Ray tasks take one each): 10,240 rows at the
#      authors' settings, the budget and the time.
# Each part has its own time limit, so one that hangs does not take the others' time.
# SMALL=1 shrinks every size for a dry run on a CPU; PARTS=1,4 runs only those parts.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
if [ -n "${SMALL:-}" ]; then
  R=2000 PR=1500 HELD=500 EP=2 EV=1,2 FE=1 NR=600
else
  R=50000 PR=45000 HELD=5000 EP=40 EV=10,20,40 FE=2 NR=10240
fi
want() { case ",${PARTS:-1,2,3,4,5}," in *",$1,"*) return 0;; esac; return 1; }
python3 -c "import torch, ray; print('torch', torch.__version__, 'ray', ray.__version__, 'cuda', torch.cuda.is_available())"
if want 1; then
echo "== 1: passes"; date
timeout 240 python3 bench/dvae_throughput.py --parts passes --rows $R --pass-nets paper \
  --pass-variants 256:1:0,2048:1:0,2048:2:0,2048:1:1 --label passes 2>&1 | grep -a -v "img/s\]" | tee "$OUT/passes.log" \
  | grep -a -E "^\{|Error|Traceback|^\|"
fi
if want 2; then
echo "== 2: AR poison + paper stage-1 probe"; date
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT  # the poisoned and clean sets written for part 2
timeout 220 sh -c "python3 - $R $probe <<'PY'
import sys
from pathlib import Path

from raypurify.attacks.base import poison
from raypurify.data.interchange import write_images
from raypurify.data.registry import load
from raypurify.data.spec import DatasetSpec

rows, out = int(sys.argv[1]), Path(sys.argv[2])
clean = load(DatasetSpec(name='cifar10', subset=rows if rows < 50_000 else None, seed=0))
poisoned, budget = poison(clean, 'ar')
write_images(clean, out / 'clean' / 'data')
write_images(poisoned, out / 'ar' / 'data')
print('AR poison', len(clean), 'rows', budget, flush=True)
PY
python3 bench/stage1_probe.py --poison $probe/ar/data --clean $probe/clean/data --rows $PR \
  --held $HELD --epochs $EP --evals $EV --preset paper --set precision=fp32 --label paper" 2>&1 \
  | grep -a -v "img/s\]" | tee "$OUT/probe.log" | tail -20
fi
if want 3; then
echo "== 3: paper preset end to end, $FE epochs per stage"; date
timeout 110 python3 bench/dvae_throughput.py --parts none --rows $R --full --full-preset paper \
  --full-set stage1.epochs=$FE --full-set stage2.epochs=$FE --label paper-e2e 2>&1 | grep -a -v "img/s\]" \
  | tee "$OUT/full.log" | grep -a -E "^\{|Error|Traceback"
fi
if want 4; then
echo "== 4: passes, Ray Data's resource reservation off"; date
timeout 120 python3 bench/dvae_throughput.py --parts passes --rows $R --pass-nets paper \
  --pass-variants 256:1:0 --no-reservation --label passes-no-reservation 2>&1 | grep -a -v "img/s\]" \
  | tee "$OUT/passes-no-reservation.log" | grep -a -E "^\{|Error|Traceback"
fi
if want 5; then
echo "== 5: NTGA crafting"; date
timeout 200 python3 - $NR <<'PY' 2>&1 | grep -a -v "img/s\]" | tee "$OUT/ntga.log" | tail -5
import sys, time
from raypurify.attacks.base import poison
from raypurify.data.registry import load
from raypurify.data.spec import DatasetSpec

rows = int(sys.argv[1])
clean = load(DatasetSpec(name='cifar10', subset=rows, seed=0))
start = time.perf_counter()
_, budget = poison(clean, 'ntga')
print('NTGA', rows, 'rows', round(time.perf_counter() - start, 1), 's', budget, flush=True)
PY
fi
date; echo "logs in $OUT"
