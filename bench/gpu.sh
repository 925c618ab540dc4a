#!/usr/bin/env bash
# The cost benchmark's GPU path (issue 13) in one call: BLIP-base retrieval and VQA on one CUDA GPU, 384 px,
# LAVIS's published batch (retrieval 32, VQA 16), bf16 autocast, CUDA-event timing, max_memory_allocated;
# 3 interleaved rounds x 5 timed steps after 3 warm-up steps. Writes bench/results/cost_gpu.{json,md}
# (and copies them, with the log, to $OUT when that is set). Budget: well under 8 minutes on one H200.
#
#   bash bench/gpu.sh            run it (on the GPU machine)
#   bash bench/gpu.sh pack       build .gpu/site.tar.gz (on the development machine, from .venv; no network)
#   bash bench/gpu.sh check      on the development machine: pack, then import the whole benchmark with only
#                                that bundle, the stubs and the packages the GPU image has (a dry run, no GPU)
#
# Why a bundle: the workplace's GPU machine (python3 3.12 with torch 2.11, transformers 5, no network) has no
# LAVIS. LAVIS 1.0.2 needs transformers < 4.27, timm 0.4.12, fairscale 0.4.4 and friends; all of them are pure
# Python, so `pack` copies them from .venv (about 15 MB compressed) and `run` puts them first on PYTHONPATH.
# Modules LAVIS imports at import time but the benchmark never calls (spaCy for img2prompt, pycocotools and
# pycocoevalcap for caption evaluation, decord for video) are replaced by empty stubs, and transformers 4.26's
# import-time pin of tokenizers (< 0.14; the image has 0.23, only the slow BertTokenizer is used) is relaxed in
# the bundle's copy. With the device tool: first `bash bench/gpu.sh pack` here, then
#   run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=600)
# On a machine whose python already has the LAVIS stack and a CUDA torch:
#   AURORA_GPU_PYTHON=.venv/bin/python bash bench/gpu.sh
# Extra arguments after `run` go to bench.cost (e.g. `bash bench/gpu.sh run --rounds 2 --arch retrieval`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUNDLE=.gpu/site.tar.gz
PACKAGES="lavis salesforce_lavis-1.0.2.dist-info transformers transformers-4.26.1.dist-info
  huggingface_hub huggingface_hub-0.36.2.dist-info timm timm-0.4.12.dist-info fairscale fairscale-0.4.4.dist-info
  iopath iopath-0.1.10.dist-info omegaconf omegaconf-2.4.0.dist-info webdataset webdataset-1.0.2.dist-info
  braceexpand braceexpand-0.1.7.dist-info tensorly tensorly-0.10.0.dist-info peft peft-0.13.2.dist-info"

pack() {
  local site=.venv/lib/python3.11/site-packages
  mkdir -p .gpu
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  for p in $PACKAGES; do [ -e "$site/$p" ] || { echo "gpu.sh: $site/$p is missing" >&2; exit 1; }; done
  # shellcheck disable=SC2086
  tar -C "$site" --exclude=__pycache__ --exclude='*.pyc' -czf "$BUNDLE" $PACKAGES
  echo "gpu.sh: $BUNDLE, $(du -h "$BUNDLE" | cut -f1)"
}

# unpack the bundle into $1 and write the stubs; prints nothing
install_bundle() {
  local site=$1
  mkdir -p "$site"
  tar -C "$site" -xzf "$BUNDLE"
  sed -i 's/"tokenizers": "tokenizers[^"]*"/"tokenizers": "tokenizers"/' "$site/transformers/dependency_versions_table.py"
  mkdir -p "$site/spacy" "$site/pycocoevalcap" "$site/pycocotools" "$site/decord"
  echo '"""Stub (bench/gpu.sh): imported by LAVIS img2prompt, never called by the benchmark."""' > "$site/spacy/__init__.py"
  echo '' > "$site/pycocoevalcap/__init__.py"
  echo 'COCOEvalCap = None  # stub (bench/gpu.sh): caption evaluation, not used' > "$site/pycocoevalcap/eval.py"
  echo '' > "$site/pycocotools/__init__.py"
  echo 'COCO = None  # stub (bench/gpu.sh): caption evaluation, not used' > "$site/pycocotools/coco.py"
  cat > "$site/decord/__init__.py" <<'EOF'
"""Stub (bench/gpu.sh): LAVIS's video loaders import decord at import time; the benchmark reads no video."""
import types

VideoReader = None
bridge = types.SimpleNamespace(set_bridge=lambda name: None)
EOF
}

run() {
  local python=${AURORA_GPU_PYTHON:-}
  if [ -z "$python" ]; then
    [ -f "$BUNDLE" ] || { echo "gpu.sh: no $BUNDLE: run 'bash bench/gpu.sh pack' where .venv is, and carry .gpu" >&2; exit 1; }
    python=python3
    install_bundle /tmp/aurora_gpu_site
    export PYTHONPATH=/tmp/aurora_gpu_site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  mkdir -p bench/results
  set +e
  # 3 rounds x (3 warm-up + 5 timed) steps per method; adapter file sizes are device-independent (cost.json).
  timeout 540 "$python" -m bench.cost --device cuda --rounds 3 --skip sizes "$@" 2>&1 | tee bench/results/cost_gpu.log
  local status=${PIPESTATUS[0]}
  set -e
  if [ -n "${OUT:-}" ]; then
    cp bench/results/cost_gpu.log "$OUT/" || true
    cp bench/results/cost_gpu.json bench/results/cost_gpu.md bench/results/cost_gpu_step_time.png "$OUT/" 2>/dev/null || true
  fi
  return "$status"
}

check() {
  pack
  local sim=/tmp/aurora_gpu_check
  rm -rf "$sim" && mkdir -p "$sim/image"
  install_bundle "$sim/site"
  # the GPU image's packages, stood in for by .venv's: everything but what the bundle brings or stubs replace
  local site=$ROOT/.venv/lib/python3.11/site-packages
  for entry in "$site"/*; do
    name=$(basename "$entry")
    case "$name" in
      lavis|transformers|huggingface_hub|timm|fairscale|iopath|omegaconf|webdataset|braceexpand|tensorly|peft) continue ;;
      spacy|spacy_*|thinc|blis|cymem|preshed|murmurhash|srsly|catalogue|confection|wasabi|weasel|pydantic*) continue ;;
      pycocotools|pycocoevalcap|decord|decord.libs|__editable__*|*.pth|aurora_pet*) continue ;;
    esac
    ln -s "$entry" "$sim/image/$name"
  done
  PYTHONPATH=$sim/site:$ROOT:$sim/image "$ROOT/.venv/bin/python" -S - <<'EOF'
import sys
import warnings

warnings.simplefilter("ignore")
from bench import cost  # noqa: E402  (LAVIS, transformers, timm, fairscale, peft, aurora_pet)

model = cost.build("retrieval", "tiny", 32)
for method in (cost.training_methods()[1], cost.training_methods()[-2]):  # Aurora, peft's LoRA
    cost._install(model, method).teardown()
for name in ("lavis", "transformers", "huggingface_hub", "timm", "fairscale", "peft", "spacy", "decord", "aurora_pet"):
    print(f"{name:16s} {sys.modules[name].__file__}")
print("gpu.sh check: the bundle imports and builds BLIP (torch", __import__("torch").__version__, ")")
EOF
}

case "${1:-run}" in
  pack) pack ;;
  check) check ;;
  run) shift || true; run "$@" ;;
  *) run "$@" ;;
esac
