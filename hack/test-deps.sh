#!/usr/bin/env bash
# Installs the Debian packages the tests run for real, when they are missing.
# etcd-server: the envtest Kubernetes API server's storage; shellcheck: the scripts' lint;
# nats-server (JetStream) and redis-server: the real servers the provisioners and services use;
# chromium and chromium-driver: the headless browser that drives the dashboard's test.
# prometheus: its promtool checks the chart's alerting rules.
set -euo pipefail
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v curl >/dev/null || missing+=(curl)
command -v xz >/dev/null || missing+=(xz-utils)
command -v openssl >/dev/null || missing+=(openssl)
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v nats-server >/dev/null || missing+=(nats-server)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v promtool >/dev/null || missing+=(prometheus)
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -eq 0 ]]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else
  echo "test-deps: missing ${missing[*]}; install them (apt-get install ${missing[*]}) and run again" >&2
  exit 1
fi
echo "test-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
