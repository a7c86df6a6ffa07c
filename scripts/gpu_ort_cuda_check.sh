#!/usr/bin/env bash
# On a GPU machine with onnxruntime-gpu: the demo chain, then ONNX Runtime's CUDA provider on the original and
# plugin models (the plugin through its standard-op reference), fp32 and fp16 graphs: per-layer correctness and
# latency at sequence 512 and 2048, batch 1. Writes everything to $OUT (default results/ort-cuda/).
#   bash scripts/gpu_ort_cuda_check.sh
set -euo pipefail
OUT=${OUT:-results/ort-cuda}
mkdir -p "$OUT"
W=$(mktemp -d)
{
python - <<'PY'
import onnxruntime as ort, torch, transformers
print("device:", torch.cuda.get_device_name(), "| onnxruntime", ort.__version__, ort.get_available_providers(),
      "| torch", torch.__version__, "| transformers", transformers.__version__)
PY
python deberta_pytorch2onnx.py --filename "$W/deberta.onnx" --seq-len 512
for flags in "" "--plugin" "--correctness-check" "--fp16" "--fp16 --plugin" "--fp16 --correctness-check"; do
  python deberta_onnx_modify.py "$W/deberta.onnx" $flags
done
python deberta_ort_inference.py --onnx "$W/deberta" --correctness-check fp32 --provider cuda --batch-size 2
python deberta_ort_inference.py --onnx "$W/deberta_fp16" --correctness-check fp16 --provider cuda --batch-size 2
for seq in 512 2048; do
  for model in deberta_original deberta_plugin; do
    python deberta_ort_inference.py --onnx "$W/$model.onnx" --test fp32 --provider cuda --seq-len $seq
  done
  for model in deberta_fp16_original deberta_fp16_plugin; do
    python deberta_ort_inference.py --onnx "$W/$model.onnx" --test fp16 --provider cuda --seq-len $seq
  done
done
} 2>&1 | tee "$OUT/log.txt"
