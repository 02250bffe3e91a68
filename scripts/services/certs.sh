#!/usr/bin/env bash
# Test certificates for the brokers' TLS listeners, made with openssl at start:
#
#   certs.sh DIR    write DIR/ca.pem (a throwaway CA), DIR/server.pem (key + certificate
#                   for 127.0.0.1 and localhost, signed by it) and DIR/server.key/.crt;
#                   no-op when they exist
#
# Loopback-only test brokers: the CA's key is deleted once the certificate is signed.
set -euo pipefail

dir="${1:?usage: certs.sh DIR}"
[[ -s "$dir/server.pem" && -s "$dir/ca.pem" ]] && exit 0
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=outbox-relay test CA" \
  -keyout ca.key -out ca.pem >/dev/null 2>&1
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out server.key >/dev/null 2>&1  # PKCS#8, as Kafka wants
openssl req -new -key server.key -subj "/CN=127.0.0.1" -out server.csr >/dev/null 2>&1
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
  -extfile server.ext -out server.crt >/dev/null 2>&1
cat server.key server.crt >server.pem
rm -f ca.key server.csr server.ext ca.srl
chmod 600 server.key server.pem
