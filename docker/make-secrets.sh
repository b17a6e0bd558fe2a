#!/usr/bin/env bash
# Certificates (openssl) and bearer tokens for the secure setup, in one folder:
#   ca.crt                       the CA that signed everything below (its key is not kept)
#   feature-server.crt/.key      SAN: feature-server (compose), dff-feature-server[.dff.svc
#                                [.cluster.local]] (Kubernetes), localhost, 127.0.0.1
#   engine.crt/.key              SAN: engine, dff-engine[...]; also the engine's client
#                                certificate towards the feature servers (mTLS)
#   export.crt/.key              the export job's client certificate (mTLS)
#   feature-tokens               the feature servers' --auth-tokens file: the engine's token, role read
#   engine-feature.token         that token, for the engine (--feature-token-file)
#   engine-tokens                the engine's --auth-tokens file: the export job's token, role write
#   export.token                 that token, for the export job (--token-file)
#
#   usage: docker/make-secrets.sh DIR [DAYS]     (DAYS of validity, default 365)
# Compose: DFF_SECRETS=DIR with docker/compose.secure.yaml. Kubernetes: see docker/README.md
# for the `kubectl create secret` commands that load DIR into the dff namespace.
set -euo pipefail
DIR=${1:?usage: make-secrets.sh DIR [DAYS]}
DAYS=${2:-365}
NS=${DFF_NAMESPACE:-dff}
mkdir -p "$DIR"
cd "$DIR"
umask 077
openssl req -x509 -newkey rsa:2048 -nodes -days "$DAYS" -subj "/CN=dff CA" \
  -keyout ca.key -out ca.crt 2>/dev/null
for name in feature-server engine export; do
  sans="DNS:$name,DNS:dff-$name,DNS:dff-$name.$NS.svc,DNS:dff-$name.$NS.svc.cluster.local"
  sans="$sans,DNS:localhost,IP:127.0.0.1"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$name" -keyout "$name.key" -out "$name.csr" \
    2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$sans" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
done
ft=$(openssl rand -hex 32)
et=$(openssl rand -hex 32)
printf '# TOKEN ROLE\n%s read\n' "$ft" > feature-tokens
printf '%s\n' "$ft" > engine-feature.token
printf '# TOKEN ROLE\n%s write\n' "$et" > engine-tokens
printf '%s\n' "$et" > export.token
rm -f ./*.csr ./*.ext ./*.srl ca.key
echo "secrets written to $(pwd)"
