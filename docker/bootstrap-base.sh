#!/usr/bin/env bash
# Build the local base image "localhost/dff-base" from Debian bookworm with debootstrap (no
# registry pulls). It carries python3.11 + venv, CA certificates and the few shared libraries
# the wheels need; everything else is installed by the Dockerfile into a venv.
#   usage: docker/bootstrap-base.sh [ROOTFS_DIR]      (needs root and debootstrap)
# The image is imported into Docker (when a Docker engine answers) or podman (vfs storage);
# DFF_IMAGE_TOOL=docker|podman picks one explicitly.
set -euo pipefail
ROOTFS=${1:-/var/tmp/dff-base-rootfs}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGE=localhost/dff-base

tool=${DFF_IMAGE_TOOL:-}
if [[ -z "$tool" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then tool=docker; else tool=podman; fi
fi
case "$tool" in
  docker) exists() { docker image inspect "$IMAGE" >/dev/null 2>&1; }
          import() { docker import - "$IMAGE"; } ;;
  podman) exists() { podman --storage-driver vfs image exists "$IMAGE"; }
          import() { podman --storage-driver vfs import - "$IMAGE"; } ;;
  *) echo "DFF_IMAGE_TOOL must be docker or podman, not '$tool'" >&2; exit 2 ;;
esac

if exists; then
  echo "$IMAGE already exists in $tool; skipping debootstrap"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "missing debootstrap (apt-get install -y debootstrap)" >&2; exit 2; }
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
debootstrap --variant=minbase \
  --include=python3,python3-venv,ca-certificates,libgomp1,libglib2.0-0 \
  bookworm "$ROOTFS" "$MIRROR"
# keep the image small: no apt lists or caches, no docs
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
tar -C "$ROOTFS" -c . | import
rm -rf "$ROOTFS"
echo "built $IMAGE ($tool)"
