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
