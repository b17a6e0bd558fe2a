#!/usr/bin/env bash
# Smoke test of the CPU container images, with no registry pulls and no Docker daemon:
#   1. bootstrap a Debian bookworm base image (debootstrap -> podman import: localhost/dff-base)
#   2. build the feature-server, engine and exporter targets of docker/Dockerfile with buildah
#   3. check what the images declare (non-root user, exec-form entrypoint, gRPC health check)
#   4. run a small export inside the exporter image (in-process models, mounted read-only)
#   5. start the feature server image, probe it with the health check, and export through it
#
#   usage: docker/smoke.sh            (as root; needs buildah, podman, debootstrap)
# Env: DFF_MODELS (model cache to mount, default $DFF_HOME or ~/.cache/dff), SMOKE_DATA (a class
# folder, default ../shared/data/imagenet_data/ant), SMOKE_N (images, default 12), HOST_CA (CA
# bundle for pip in the build), SMOKE_KEEP=1 keeps the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STORAGE=(--storage-driver vfs)
CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
MODELS=${DFF_MODELS:-${DFF_HOME:-$HOME/.cache/dff}}
DATA=${SMOKE_DATA:-$ROOT/../shared/data/imagenet_data/ant}
N=${SMOKE_N:-12}
WORK=$(mktemp -d /var/tmp/dff-smoke.XXXXXX)
PORT=${SMOKE_PORT:-50071}
PY=${PYTHON:-$ROOT/.venv/bin/python}  # host python with h5py + numpy, for the final check
server_pid=""
step() { printf '\n== %s  [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }
cleanup() {
  if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  for c in "${containers[@]:-}"; do [[ -n "$c" ]] && buildah "${STORAGE[@]}" rm "$c" >/dev/null 2>&1 || true; done
  [[ "${SMOKE_KEEP:-0}" == 1 ]] || rm -rf "$WORK"
}
containers=()
trap cleanup EXIT
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR

for tool in buildah podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y buildah podman debootstrap)"; exit 2; }
done
[[ -f "$MODELS/models/vgg19.onnx" ]] || { echo "no models in $MODELS/models (run: dff models build)"; exit 2; }

step "1. base image"
DFF_IMAGE_TOOL=podman bash docker/bootstrap-base.sh

step "2. build images"
for target in feature-server engine exporter; do
  t0=$(date +%s)
  buildah bud "${STORAGE[@]}" --isolation chroot --layers --format docker \
    -f docker/Dockerfile --ignorefile docker/Dockerfile.dockerignore --target "$target" \
    -v "$CA:/host-ca.crt:ro" --build-arg PIP_CERT=/host-ca.crt \
    --build-arg BASE=localhost/dff-base -t "localhost/dff-$target" .
  echo "built localhost/dff-$target in $(( $(date +%s) - t0 ))s"
done
buildah "${STORAGE[@]}" images

step "3. image metadata"
for target in feature-server engine exporter; do
  img="localhost/dff-$target"
  user=$(buildah "${STORAGE[@]}" inspect --format '{{.Docker.Config.User}}' "$img")
  entry=$(buildah "${STORAGE[@]}" inspect --format '{{.Docker.Config.Entrypoint}}' "$img")
  health=$(buildah "${STORAGE[@]}" inspect --format '{{.Docker.Config.Healthcheck}}' "$img")
  echo "$img: user=$user entrypoint=$entry healthcheck=$health"
  [[ "$user" == "dff" ]] || { echo "FAIL: $img runs as '$user', not dff"; exit 1; }
  # exec form: the entrypoint is the dff program itself, not `/bin/sh -c "..."`
  [[ "$entry" == '[dff '* ]] || { echo "FAIL: $img entrypoint is not exec form"; exit 1; }
  if [[ "$target" != exporter ]]; then
    [[ "$health" == *exporter.healthcheck* ]] || { echo "FAIL: $img has no gRPC health check"; exit 1; }
  fi
done

step "4. export inside the exporter image (in-process)"
mkdir -p "$WORK/data/ant" "$WORK/out" "$WORK/out-fs"
mapfile -t photos < <(find "$DATA" -maxdepth 1 -type f -iname '*.jpg' | sort)
cp "${photos[@]:0:$N}" "$WORK/data/ant/"
chmod -R a+rX "$WORK/data"; chmod 777 "$WORK/out" "$WORK/out-fs"
ctr=$(buildah "${STORAGE[@]}" from localhost/dff-exporter); containers+=("$ctr")
t0=$(date +%s)
buildah "${STORAGE[@]}" run --isolation chroot \
  -v "$MODELS:/var/lib/dff:ro" -v "$WORK/data:/data:ro" -v "$WORK/out:/out" \
  "$ctr" -- dff discover /data/ant --out /out --k 3 --no-progress
echo "in-process export took $(( $(date +%s) - t0 ))s"
for f in concepts.h5 index.html summary.json k_sweep.png; do
  [[ -s "$WORK/out/ant/$f" || "$f" == k_sweep.png ]] || { echo "FAIL: missing out/ant/$f"; exit 1; }
done
ls -la "$WORK/out/ant"
echo "combined overlays: $(ls "$WORK/out/ant/combined" | wc -l)"
python3 -c "import json,sys; s=json.load(open('$WORK/out/ant/summary.json')); print({k: s[k] for k in ('status','n_images','n_kept','k','k_reason')})"

step "5. feature server image + health probe + export through it"
fs=$(buildah "${STORAGE[@]}" from localhost/dff-feature-server); containers+=("$fs")
buildah "${STORAGE[@]}" run --isolation chroot -v "$MODELS:/var/lib/dff:ro" \
  "$fs" -- dff serve features --no-build --host 127.0.0.1 --port "$PORT" &
server_pid=$!
ok=0
for _ in $(seq 1 90); do
  if buildah "${STORAGE[@]}" run --isolation chroot "$ctr" -- \
       python -m exporter.healthcheck "127.0.0.1:$PORT" 2>/dev/null; then ok=1; break; fi
  sleep 2
done
[[ $ok == 1 ]] || { echo "FAIL: feature server never became SERVING"; exit 1; }
buildah "${STORAGE[@]}" run --isolation chroot \
  -v "$WORK/data:/data:ro" -v "$WORK/out-fs:/out" \
  "$ctr" -- dff discover /data/ant --out /out --k 3 --no-progress --feature-server "127.0.0.1:$PORT"
"$PY" - "$WORK" <<'PY'
import sys, h5py, numpy as np
w = sys.argv[1]
a = h5py.File(f"{w}/out/ant/concepts.h5")["bases"][()]
b = h5py.File(f"{w}/out-fs/ant/concepts.h5")["bases"][()]
print("bases in-process vs feature server: max abs diff", float(np.abs(a - b).max()), "of max", float(np.abs(a).max()))
assert np.allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(a).max())
PY
echo "stopping the feature server container (buildah reports the kill as 'exit status 1')"
kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""

step "SMOKE OK"
