#!/usr/bin/env bash
# Every GPU check of the project in one run, for a machine with one CUDA GPU (about 8 minutes):
#   1. versions and the device;
#   2. tests/test_cuda.py: the deformable conv and its backward on CUDA, the detector in bf16 and
#      fp16 against fp32, AMP steps with the GradScaler, a 2-process SyncBatchNorm step (gloo);
#   3. train.py on the synthetic set for 20 iterations, --resume to its end (30), evaluate.py
#      --device cuda on the checkpoint;
#   4. training images/s at 608 (batch 16, bf16 and fp16) and the eval FPS at 608 (batch 1,
#      fp16) beside the paper's 46 FPS (V100): a table, then the same figures as one JSON line.
# No GPU visible: one line on stderr, exit status 1. A failing part is reported and the others
# still run; the exit status is then 1. pycocotools must import (on a bare GPU image, install its
# wheel first). Usage: bash tests/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 1
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check.sh: no GPU is visible to torch (torch.cuda.is_available() is False); run it on a machine with a CUDA GPU" >&2
    exit 1
fi
export ASFF_TEST_CUDA=1 PYTHONUNBUFFERED=1
work=$(mktemp -d)
status=0
part() {   # part NAME LOG COMMAND...: run it into LOG, print its last lines, remember a failure
    local name=$1 log=$2; shift 2
    echo "== $name"
    "$@" > "$log" 2>&1
    local rc=$?
    tail -n 15 "$log"
    [ $rc -eq 0 ] || { status=1; echo "== FAILED: $name (exit status $rc)"; }
}

python -c "import torch, numpy, PIL, pycocotools; d = torch.cuda.get_device_properties(0);
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}),',
      f'numpy {numpy.__version__}, pillow {PIL.__version__};', f'{d.name}, compute capability',
      f'{d.major}.{d.minor}, {d.total_memory / 2**30:.0f} GiB')" || { echo "== FAILED: imports"; exit 1; }

part "tests/test_cuda.py" "$work/pytest.log" python -m pytest tests/test_cuda.py -q -rs
run="$work/run"
short=(--synthetic-train 160 --synthetic-val 16 --epochs 3 --workers 2)
part "train.py, 20 iterations" "$work/train.log" python train.py --out "$run" "${short[@]}" --max-iters 20
part "train.py --resume to the end" "$work/resume.log" python train.py --resume "$run/last.pt" --max-iters 0
part "the resumed checkpoint" "$work/ckpt.log" python -c "import torch, sys
state = torch.load(sys.argv[1], weights_only=True)
assert state['iteration'] == 30 and state['epoch'] == 3 and state['evaluated_at'] == 30, state['iteration']
print('last.pt: iteration 30, epoch 3, AP', round(state['metrics']['AP'], 4))" "$run/last.pt"
part "evaluate.py --device cuda" "$work/eval.log" python evaluate.py --weights "$run/last.pt" --device cuda

amps=(fp16)
python -c "import sys, torch; sys.exit(torch.cuda.get_device_capability() < (8, 0))" && amps=(bf16 fp16)
for amp in "${amps[@]}"; do
    part "training throughput, $amp, 16 images at 608" "$work/train_$amp.log" \
        python tests/bench.py train --steps 5 --batch-size 16 --size-max 608 --amp "$amp"
done
part "eval forward at 608, fp16, batch 1" "$work/speed.log" \
    python tests/bench.py speed --half --device cuda --speed-sizes 608 --variants asff --runs 20

python - "$work" <<'EOF'
import json, sys
from pathlib import Path
work, figures = Path(sys.argv[1]), {}
def last_json(name):
    try:
        return json.loads((work / name).read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
for amp in ("bf16", "fp16"):
    if (row := last_json(f"train_{amp}.log")) is not None:
        figures[f"train_images_per_s_608_{amp}"] = row["images_per_s"]
if (row := last_json("speed.log")) is not None:
    ms = row.get("forward_folded_ms_asff_608", row.get("forward_ms_asff_608")) + row["decode_nms_ms_608"]
    figures["eval_fps_608_fp16"] = round(1000 / ms, 1)
figures["paper_fps_608_v100"] = 46
print("\n== figures")
for key, value in figures.items():
    print(f"{key:<32}{value:>10}")
print(json.dumps(figures))
EOF
[ $status -eq 0 ] && echo "== all GPU checks passed" || echo "== some GPU checks FAILED"
exit $status
