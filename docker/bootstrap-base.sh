#!/usr/bin/env bash
# Build the local base image "localhost/dff-base" from Debian bookworm with debootstrap (no
# registry pulls). It carries python3.11 + venv, CA certificates and the few shared libraries
# the wheels need; everything else is installed by the Dockerfiles into a venv.
#   usage: docker/bootstrap-base.sh [ROOTFS_DIR]      (needs root, debootstrap, podman)
set -euo pipefail
ROOTFS=${1:-/var/tmp/dff-base-rootfs}
STORAGE=(--storage-driver vfs)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if podman "${STORAGE[@]}" image exists localhost/dff-base; then
  echo "localhost/dff-base already exists; skipping debootstrap"
  exit 0
fi
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
debootstrap --variant=minbase \
  --include=python3,python3-venv,ca-certificates,libgomp1,libglib2.0-0 \
  bookworm "$ROOTFS" "$MIRROR"
# keep the image small: no apt lists or caches
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb
tar -C "$ROOTFS" -c . | podman "${STORAGE[@]}" import - localhost/dff-base
rm -rf "$ROOTFS"
echo "built localhost/dff-base"
