#!/usr/bin/env bash
# GPU smoke: the paper-mini world (tests/paper_mini.py: release-format files, tiny random weights)
# end to end through config/llava_more.yaml with `device: cuda`, model in bfloat16.
#   bash benchmarks/gpu_smoke.sh [OUT_DIR]
# Needs a CUDA torch and the runtime packages (envs/requirements.txt); prints the wall time, the
# device every job logged and the tables' row counts. Goal: under 8 minutes on one GPU.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0))"
mkdir -p "$OUT"
for item in Snakefile workflow config envs; do cp -r "$REPO/$item" "$OUT/"; done
start=$(date +%s)
PYTHONPATH="$REPO:$REPO/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$OUT" <<'PYEOF'
import sys, threading, yaml
from pathlib import Path
from tests.paper_mini import build, paper_mini_config
from tests.llm_server import LLMServer

out = Path(sys.argv[1])
build(out)
server = LLMServer().__enter__()  # the auto-interp stage talks to it over 127.0.0.1
cfg = paper_mini_config(server.url)
cfg["device"] = "cuda"
(out / "paper_mini.yaml").write_text(yaml.safe_dump(cfg))
import os, subprocess
env = {**os.environ, "OPENAI_API_KEY": "sk-local-smoke", "PYTHONPATH": os.environ["PYTHONPATH"]}
r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "4", "--configfile", "paper_mini.yaml"],
                   cwd=out, env=env)
server.__exit__(None, None, None)
sys.exit(r.returncode)
PYEOF
echo "wall: $(( $(date +%s) - start )) s"
grep -ho "CUDA_VISIBLE_DEVICES=[^)]*" "$OUT"/logs/llava_more/*.log "$OUT"/logs/llava_more/*/*.log | sort | uniq -c
grep -l "falling back to CPU" "$OUT"/logs/llava_more/*.log "$OUT"/logs/llava_more/*/*.log || true
PYTHONPATH="$REPO/src" "$PY" -c "
import pandas as pd, pathlib
for t in sorted(pathlib.Path('$OUT/results/llava_more/tables').glob('*.parquet')):
    print(f'{t.stem:28s} {len(pd.read_parquet(t)):6d} rows')"
# paper-shape throughput on this GPU (issue [I]): SAE fine-tuning at d_model 4096, d_sae 32768, k 50,
# batch 4096 (tokens/s and the share of the TF32 peak), and the stream from the node's disk
PYTHONPATH="$REPO/src" "$PY" "$REPO/benchmarks/bench_sae_train.py" --device cuda --d-model 4096 --expansion 8 \
    --k 50 --batch-size 4096 --steps 20 --repeats 3 --only stagediff
PYTHONPATH="$REPO/src" "$PY" "$REPO/benchmarks/bench_stream.py" --device cuda --d-model 4096 --d-sae 32768 --k 50 \
    --tokens 2000000 --buffer-tokens 1000000 --chunk-rows 256 --chunks-per-shard 64 --read-chunks 16 \
    --repeats 2 --dir "$OUT"
