#!/bin/bash
# Every GPU check of the project in one run, for a machine with one CUDA GPU (a few minutes):
# tests/test_cuda.py (deformable conv on CUDA vs CPU, AMP steps and the GradScaler skip,
# SyncBatchNorm and a 1-rank NCCL DDP step against a plain one, evaluate.py --speed --half),
# then the README's measured-table commands: the forward at 608 in fp16 and fp32 (batch 1) and
# the training throughput of 16 images at 608 with mixed precision. Each part's last lines are
# printed; a failing part does not stop the others. Usage: bash tests/gpu_check.sh
cd "$(dirname "$0")/.." || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
status=0
part() {   # part NAME COMMAND...: run it, print its tail, remember a failure
    echo "== $1"; shift
    "$@" > /tmp/gpu_check.log 2>&1
    rc=$?; [ $rc -eq 0 ] || { status=1; echo "(exit status $rc)"; }
    tail -n 25 /tmp/gpu_check.log
}
part "tests/test_cuda.py" env ASFF_TEST_CUDA=1 python -m pytest tests/test_cuda.py -rs
part "forward at 608, fp16" python tests/bench.py speed --half --device cuda --speed-sizes 608
part "forward at 608, fp32" python tests/bench.py speed --device cuda --speed-sizes 608
part "training, 16 images at 608" python tests/bench.py train --steps 5 --batch-size 16 --size-max 608
exit $status
