#!/usr/bin/env bash
# One GPU check, one table: the gpu tests, the feature benchmark (img/s per precision, batch
# sizes tuned), the NMF benchmark (ms per HALS iteration at N=5000, k=6, CuPy vs CPU) and one
# `dff discover` (wall and stage shares). Meant to finish in under 8 minutes on one H100.
#
# The device machine has no network and receives only the repo plus carried folders (64 MiB),
# so prepare the carried folder HERE first (models, a few photos, the gRPC/protobuf wheels
# the generated stubs need):
#
#     bash benchmarks/device_check.sh --prepare            # fills .device-cache/ (~50 MiB)
#
# then, on the device machine (the `run` tool: carry [".device-cache"]):
#
#     bash benchmarks/device_check.sh                       # table on stdout, logs in $OUT
#
# It uses the machine's own python3 (numpy, scipy, onnxruntime, CuPy, torch, OpenCV, h5py
# there); carried wheels go to /tmp/dff-site. ONNX Runtime's CUDA/TensorRT providers need the
# onnxruntime-gpu wheel (~250 MB, more than a carry): where it is missing, the feature rows
# run on ONNX Runtime's CPU provider and a torch fp16 row (same weights, network only) shows
# what the GPU does. DFF_DEVICE_CHECK_CPU=1 runs everything in a reduced form on a machine
# without a GPU (what the test suite does), with the local venv's python.
set -uo pipefail

case "${1:-}" in
    ""|--prepare|--prepare-ort|--install-ort) ;;
    -h|--help)
        # the comment block above, without its '# ' (everything up to `set -uo pipefail`)
        sed -n '2,/^set -uo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
        echo "usage: bash benchmarks/device_check.sh [--prepare | --prepare-ort | --install-ort]"
        exit 0 ;;
    *)
        echo "device_check.sh: unknown argument '$1'" >&2
        echo "usage: bash benchmarks/device_check.sh [--prepare | --prepare-ort | --install-ort | --help]" >&2
        exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${DFF_DEVICE_CACHE:-$ROOT/.device-cache}"
REDUCED="${DFF_DEVICE_CHECK_CPU:-0}"
PY="${PYTHON:-python3}"
LOGS="${OUT:-$(mktemp -d)}"
WORK="$(mktemp -d)"
export PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--prepare" ]]; then
    PY="${PYTHON:-$ROOT/.venv/bin/python}"
    [[ -x "$PY" ]] || PY=python3
    rm -rf "$CACHE" && mkdir -p "$CACHE/wheels"
    PYTHONPATH="$ROOT/protos:$ROOT" "$PY" "$ROOT/benchmarks/device_models.py" \
        --prepare "$CACHE" --photos "${DFF_DEVICE_PHOTOS:-48}" || exit 1
    # the generated stubs check their protobuf/grpcio versions: carry the ones used here
    pins=$("$PY" -m pip list --format=freeze 2>/dev/null \
        | grep -E '^(grpcio|grpcio-health-checking|grpcio-reflection|protobuf)==')
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$CACHE/wheels" $pins || exit 1
    # py-spy: where a served image's CPU goes on the device (one server worker's stacks)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux_2_5_x86_64 \
        --platform manylinux1_x86_64 -d "$CACHE/wheels" py-spy==0.4.3 \
        || echo "py-spy not packed: the check runs without the server profile" >&2
    du -sh "$CACHE"
    exit 0
fi

ORT_PACK="$ROOT/.device-ort/ort-gpu.tar.xz"
ORT_DIR="${DFF_DEVICE_ORT:-/tmp/dff-ort}"
if [[ "${1:-}" == "--prepare-ort" ]]; then
    # onnxruntime-gpu cut to one carry (device code for sm_90 only): see device_ort.py
    PY="${PYTHON:-$ROOT/.venv/bin/python}"
    [[ -x "$PY" ]] || PY=python3
    rm -rf "$ROOT/.device-ort"
    exec "$PY" "$ROOT/benchmarks/device_ort.py" --prepare "$ROOT/.device-ort"
fi

step() { echo "== $1 ($(date +%T))" >&2; }
# DFF_DEVICE_STEPS picks steps (comma-separated; default all: tests,features,nmf,ksweep -
# the k sweep on the host and on the GPU at 25..1300 images, for DFF_GPU_MIN_ROWS -, discover,
# export - the 3-class export (bench_export.py: ant, bee, gymnast), sequential and pipelined -
# and scaleout - the scale-out rows for server groups of DFF_DEVICE_SCALE_OUT processes, default
# 8,12 (2 on the CPU), fed by 4 client processes, sparse answers from float32 and float16 inputs
# (DFF_DEVICE_SCALE_VARIANTS adds dense), then the largest group with each GPU-side setting
# undone), e.g. to rerun one on a device whose earlier call failed at it
STEPS=",${DFF_DEVICE_STEPS:-tests,features,nmf,ksweep,discover,export,scaleout},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
use_ort_gpu() {  # the carried CUDA provider, once unpacked and checked on this machine
    [[ -f "$ORT_DIR/.ok" ]] || return 1
    export PYTHONPATH="$ORT_DIR${PYTHONPATH:+:$PYTHONPATH}"
    export LD_LIBRARY_PATH="$(cat "$ORT_DIR/.lib-dirs")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
if [[ "${1:-}" == "--install-ort" || ( "$REDUCED" != "1" && -f "$ORT_PACK" && ! -f "$ORT_DIR/.ok" ) ]]; then
    # the carry of `--prepare-ort` (a call of its own: the models need the next carry); the
    # machine keeps /tmp between calls while it is warm
    step "onnxruntime-gpu"
    PY="${PYTHON:-python3}"
    rm -rf "$ORT_DIR"
    "$PY" "$ROOT/benchmarks/device_ort.py" --install "$ORT_PACK" --target "$ORT_DIR" || exit 1
    "$PY" "$ROOT/benchmarks/device_ort.py" --lib-dirs >"$ORT_DIR/.lib-dirs"
    touch "$ORT_DIR/.ok"
    if ! (use_ort_gpu && cd /tmp && "$PY" "$ROOT/benchmarks/device_ort.py" --check); then
        rm -f "$ORT_DIR/.ok"
        echo "the carried CUDA provider does not run here; the check will use the CPU provider" >&2
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(numpy|numba|cupy|onnx|onnxruntime|torch|grpcio|protobuf|opencv|h5py|scipy|scikit-learn) '
    [[ "${1:-}" == "--install-ort" ]] && exit 0
fi
export DFF_HOME="$WORK/home"
if [[ "$REDUCED" == "1" ]]; then
    PY="${PYTHON:-$ROOT/.venv/bin/python}"
    [[ -x "$PY" ]] || PY=python3
    N_IMAGES=16; NMF_N=200; NMF_ITERS=5; BATCHES="8"; PHOTOS=12; TEST_SELECT="-m gpu"
else
    N_IMAGES=512; NMF_N=5000; NMF_ITERS=20; BATCHES="32,128,256"; PHOTOS=48
    TEST_SELECT="-m gpu"
fi
# a GPU runs the network in batches of 64 from 4 client streams; the CPU form keeps 8 and 1
# the scale-out row: WORKERS server processes on one port, as many client processes sending
# prepared network inputs (one Python process holds the GIL ~0.45 ms per image: ~2000 img/s
# at most)
BATCH=8; STREAMS=1; PRECISIONS=""; WORKERS=2
if [[ "$REDUCED" != "1" ]]; then BATCH=64; STREAMS=4; PRECISIONS="fp32,fp16"; WORKERS=4; fi
WORKERS="${DFF_DEVICE_WORKERS:-$WORKERS}"
if ls "$CACHE"/wheels/*.whl >/dev/null 2>&1 && [[ "$REDUCED" != "1" ]]; then
    step "carried wheels"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/dff-site "$CACHE"/wheels/*.whl || exit 1
    export PYTHONPATH="/tmp/dff-site:$ROOT/protos:$ROOT" PATH="/tmp/dff-site/bin:$PATH"
else
    export PYTHONPATH="$ROOT/protos:$ROOT"
fi
if [[ "$REDUCED" != "1" ]]; then
    if use_ort_gpu; then
        echo "using the carried onnxruntime-gpu" >&2
    elif command -v nvidia-smi >/dev/null && [[ "${DFF_DEVICE_ALLOW_CPU_EP:-0}" != "1" ]] \
        && ! "$PY" -c "import onnxruntime as o, sys; \
sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
        # a GPU, but ONNX Runtime without its CUDA provider: the machine went back between
        # the --install-ort call and this one (it stays up ~30 s), so /tmp lost the carry.
        # Stop here rather than spend minutes of device time on CPU-provider rows.
        echo "no CUDA provider here: run --install-ort first (carry .device-ort), then this" \
             "within the machine's idle window; DFF_DEVICE_ALLOW_CPU_EP=1 runs anyway" >&2
        exit 3
    fi
fi
cd "$ROOT" || exit 1

step "models"
if [[ -d "$CACHE/models" ]]; then
    "$PY" benchmarks/device_models.py --install "$CACHE" --home "$DFF_HOME" \
        >"$LOGS/models.log" 2>&1 || { cat "$LOGS/models.log"; exit 1; }
    DATA="$CACHE/photos/ant"
else  # a machine with the real cache (e.g. this one): use it
    export DFF_HOME="${DFF_HOME_REAL:-$HOME/.cache/dff}"
    DATA="$ROOT/../shared/data/imagenet_data/ant"
fi
mkdir -p "$WORK/photos/ant"
ls "$DATA" | grep -i -E '\.jpe?g$' | head -n "$PHOTOS" | while read -r f; do
    cp "$DATA/$f" "$WORK/photos/ant/"; done
"$PY" - <<'EOF' >"$LOGS/env.txt" 2>&1
import onnxruntime as ort, platform
print("python", platform.python_version(), "onnxruntime", ort.__version__,
      "providers", ort.get_available_providers())
try:
    import cupy
    print("cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())
except Exception as exc:
    print("cupy unavailable:", exc)
EOF
cat "$LOGS/env.txt" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader >"$LOGS/gpu.txt" 2>&1

if want tests; then
step "gpu tests"
# the gpu tests read real photos from ../shared/data, which does not travel: the carried ones
SHARED_ANT="$ROOT/../shared/data/imagenet_data/ant"
if [[ ! -d "$SHARED_ANT" ]]; then mkdir -p "$SHARED_ANT" && cp "$WORK/photos/ant/"* "$SHARED_ANT/"; fi
# only the modules that hold gpu tests: others may import what the machine lacks; warnings are
# shown, not errors (the machine's package versions are not the pinned ones)
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -W default $TEST_SELECT \
    $(grep -rl --include='test_*.py' 'mark.gpu' tests) >"$LOGS/tests.log" 2>&1
echo "tests rc=$?" >>"$LOGS/tests.log"
fi

if want features; then
step "feature benchmark"
# DFF_BENCH_PROFILE: py-spy (when carried) records one scale-out server worker
DFF_BENCH_PROFILE="$LOGS/server-profile" timeout 330 \
    "$PY" benchmarks/bench_features.py --images "$N_IMAGES" --batch-size "$BATCH" \
    --batch-sizes "$BATCHES" --streams "$STREAMS" ${PRECISIONS:+--precisions "$PRECISIONS"} \
    --repeat 1 --data "$WORK/photos/ant" --server-process --json "$LOGS/features.json" \
    --server-workers "$WORKERS" --client-procs "$WORKERS" \
    >"$LOGS/features.log" 2>&1 || echo "feature benchmark failed (see features.log)" >&2
if "$PY" -c "import torch,sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    step "torch fp16 reference"
    timeout 60 "$PY" benchmarks/torch_vgg.py --gpu-reference --batch-sizes 64,128,256 \
        --json "$LOGS/torch_ref.json" >"$LOGS/torch_ref.log" 2>&1
fi
fi

if want scaleout; then
step "scale-out"
GROUPS_DEFAULT="8,12"; [[ "$REDUCED" == "1" ]] && GROUPS_DEFAULT="2"
DFF_BENCH_PROFILE="$LOGS/server-profile" timeout 300 \
    "$PY" benchmarks/bench_features.py --scale-out-only "${DFF_DEVICE_SCALE_OUT:-$GROUPS_DEFAULT}" \
    --scale-out-variants "${DFF_DEVICE_SCALE_VARIANTS:-sparse,f16-sparse}" \
    --images "$N_IMAGES" --batch-size "$BATCH" --streams "$(( STREAMS * 2 ))" \
    --precisions "$(p="${PRECISIONS:-int8}"; echo "${p##*,}")" --data "$WORK/photos/ant" \
    --client-procs "$(( REDUCED == 1 ? 2 : 4 ))" \
    --json "$LOGS/scale_out.json" 2>&1 | tee "$LOGS/scale_out.log" >&2
# the same at the largest group, float16 inputs and sparse answers, with each GPU-side setting
# undone one at a time: the worker threads spinning while they wait for the device (CUDA's
# default), the fp16 model's float32 input and outputs, and pageable host memory for the
# batches and activations (instead of pinned blocks)
LARGEST="${DFF_DEVICE_SCALE_OUT:-$GROUPS_DEFAULT}"; LARGEST="${LARGEST##*,}"
for ab in "DFF_CUDA_SYNC=spin:sync spin" "DFF_HALF_IO=0:float32 IO" "DFF_PINNED=0:pageable"; do
    env "${ab%%:*}" timeout 120 \
        "$PY" benchmarks/bench_features.py --scale-out-only "$LARGEST" \
        --scale-out-variants f16-sparse --label "${ab#*:}" \
        --images "$N_IMAGES" --batch-size "$BATCH" --streams "$(( STREAMS * 2 ))" \
        --precisions "$(p="${PRECISIONS:-int8}"; echo "${p##*,}")" --data "$WORK/photos/ant" \
        --client-procs "$(( REDUCED == 1 ? 2 : 4 ))" \
        --json "$LOGS/scale_out_${ab%%=*}.json" 2>&1 | tee -a "$LOGS/scale_out.log" >&2
done
fi

if want nmf; then
step "NMF benchmark"
RUNS="ours-hals-csr,ours-hals-cupy,sklearn-cd"
[[ "$REDUCED" == "1" ]] && RUNS="ours-hals-csr,ours-hals-cupy"
timeout 120 "$PY" benchmarks/bench_nmf.py --n-images "$NMF_N" --k 6 --iters "$NMF_ITERS" \
    --tol 0 --runs "$RUNS" --json "$LOGS/nmf.json" >"$LOGS/nmf.log" 2>&1 \
    || echo "NMF benchmark failed (see nmf.log)" >&2
fi

if want ksweep; then
step "k sweep, host and GPU"
SIZES="25,50,100,200,400,1300"; [[ "$REDUCED" == "1" ]] && SIZES="12,25"
timeout 60 "$PY" -m exporter.cli extract "$WORK/photos/ant" --out "$WORK/ant.h5" \
    >"$LOGS/ksweep.log" 2>&1 \
    && timeout 240 "$PY" benchmarks/bench_ksweep.py --images "$SIZES" --features "$WORK/ant.h5" \
    --json "$LOGS/ksweep.json" >>"$LOGS/ksweep.log" 2>&1 \
    || echo "k sweep benchmark failed (see ksweep.log)" >&2
fi

if want discover; then
step "dff discover"
# the first run on a fresh machine compiles CuPy's kernels (NVRTC) and the host kernels
# (Numba), both cached on disk; "gpu-engine" forces the concept engine onto the GPU
# (DFF_GPU_MIN_ROWS=0: a class this small stays on the host by default); "warm" is what
# every later run costs
for run in cold gpu-engine warm; do
    start=$(date +%s%N)
    min_rows=""; [[ "$run" == "gpu-engine" ]] && min_rows=0
    DFF_GPU_MIN_ROWS="${min_rows:-${DFF_GPU_MIN_ROWS:-10000}}" \
    timeout 120 "$PY" -m exporter.cli -v discover "$WORK/photos/ant" --out "$WORK/out-$run" \
        --no-progress --k-range 2-4 >>"$LOGS/discover.log" 2>&1
    echo "discover $run rc=$? wall_ms=$(( ($(date +%s%N) - start) / 1000000 ))" \
        >>"$LOGS/discover.log"
done
fi

if want export; then
step "3-class export"
# the carried photos/{ant,bee,gymnast}; on a machine with ../shared/data, those
EXPORT_ROOT="$ROOT/../shared/data"; [[ -d "$CACHE/photos/bee" ]] && EXPORT_ROOT="$CACHE/photos"
timeout 240 "$PY" benchmarks/bench_export.py --data-root "$EXPORT_ROOT" \
    --classes ant,bee,gymnast --images "$PHOTOS" --json "$LOGS/export.json" \
    >"$LOGS/export.log" 2>&1 || echo "3-class export failed (see export.log)" >&2
fi

step "table"
"$PY" benchmarks/device_report.py "$LOGS" "$WORK/out-warm" | tee "$LOGS/table.txt"
rm -rf "$WORK"
if [[ -n "${OUT:-}" && "$LOGS" == "$OUT" ]]; then
    # the device tool brings back at most 8 files: the table, and the logs in one archive
    (cd "$LOGS" && tar -czf logs.tar.gz --exclude table.txt --exclude logs.tar.gz \
        --remove-files -- *)
fi
