#!/usr/bin/env bash
# Build the CUDA feature-server image offline (local Debian base + NVIDIA's CUDA wheels from PyPI,
# no CUDA base image) and check it without a GPU: ONNX Runtime lists the CUDA execution provider,
# and `ldd` of its CUDA provider library resolves every library except the driver's libcuda.so.1
# (mounted by the NVIDIA container toolkit at run time). On a GPU host with the toolkit
# (GPU_RUN=1) it also starts the feature server with --gpus all and checks it picked CUDA.
#   usage: docker/gpu_image_check.sh      (root; a Docker engine running; docker/bootstrap-base.sh
#                                          done, e.g. by docker/compose_test.sh --build-only)
set -euo pipefail
cd "$(dirname "$0")/.."
IMG=localhost/dff-feature-server-gpu:latest
CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
WORK=$(mktemp -d /var/tmp/dff-gpu.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/context"
cp -r pyproject.toml protos feature_server concept_engine exporter dff "$WORK/context/"
[[ -f README.md ]] && cp README.md "$WORK/context/"
cp docker/Dockerfile "$WORK/context/Dockerfile"
[[ -f "$CA" ]] && cp "$CA" "$WORK/context/build-ca.pem"
find "$WORK/context" -name '__pycache__' -prune -exec rm -rf {} +
DFF_IMAGE_TOOL=docker bash docker/bootstrap-base.sh
t0=$(date +%s)
docker build -q --target feature-server-gpu --build-arg BASE=localhost/dff-base -t "$IMG" \
  "$WORK/context" > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
echo "built $IMG in $(( $(date +%s) - t0 ))s, $(( $(docker image inspect -f '{{.Size}}' "$IMG") / 1000000 )) MB"
docker image inspect -f 'user={{.Config.User}} entrypoint={{json .Config.Entrypoint}}' "$IMG"
docker run --rm --entrypoint sh "$IMG" -c '
set -e
python - <<PY
import onnxruntime as ort
print("onnxruntime", ort.__version__, "providers:", ort.get_available_providers())
assert "CUDAExecutionProvider" in ort.get_available_providers()
PY
lib=$(python -c "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), \"capi\", \"libonnxruntime_providers_cuda.so\"))")
echo "ldd $lib:"
ldd "$lib" | sed "s/^/  /"
missing=$(ldd "$lib" | grep "not found" | grep -v "libcuda.so.1" || true)
[ -z "$missing" ] || { echo "UNRESOLVED: $missing"; exit 1; }
echo "NVIDIA libraries from the wheels (ld.so.conf.d):"
ldconfig -p | grep -E "libcudart.so|libcublasLt.so|libcublas.so|libcudnn.so|libcufft.so|libcurand.so" | sed "s/^/  /"
for t in gcc cc make pip; do if command -v $t >/dev/null; then echo "found $t"; exit 1; fi; done
'
if [[ "${GPU_RUN:-0}" == 1 ]]; then
  docker run --rm --gpus all -v "${DFF_MODELS:-$HOME/.cache/dff}:/var/lib/dff:ro" --entrypoint dff \
    "$IMG" models list --verify
  docker run --rm --gpus all -v "${DFF_MODELS:-$HOME/.cache/dff}:/var/lib/dff:ro" \
    --entrypoint python "$IMG" -c \
    "import onnxruntime as ort; s = ort.InferenceSession('/var/lib/dff/models/vgg19.onnx', providers=['CUDAExecutionProvider']); print(s.get_providers())"
fi
echo "GPU IMAGE OK"
