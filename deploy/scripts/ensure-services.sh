#!/usr/bin/env bash
# Make sure the local services the relay needs answer on 127.0.0.1, starting them when they
# do not (and installing them with apt-get on Debian when they are missing and we are root).
#
# usage: deploy/scripts/ensure-services.sh rabbitmq [redis] [wrk]
# (wrk is not a service: the load generator `make bench` needs, installed the same way.)
set -euo pipefail

answers() {  # answers PORT: true when something accepts TCP connections on 127.0.0.1:PORT
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_for() {  # wait_for PORT SECONDS NAME
  local port=$1 seconds=$2 name=$3 i
  for ((i = 0; i < seconds * 4; i++)); do
    answers "$port" && return 0
    sleep 0.25
  done
  echo "ensure-services: $name did not answer on 127.0.0.1:$port after ${seconds}s" >&2
  return 1
}

install_package() {  # install_package PACKAGE
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    echo "ensure-services: installing $1 with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null ||
      { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null; }
  else
    echo "ensure-services: $1 is not installed; install it (Debian: sudo apt-get install $1)" >&2
    return 1
  fi
}

ensure_rabbitmq() {
  # the binaries also for the cluster tests' own nodes, even when a broker answers already
  command -v rabbitmq-server >/dev/null 2>&1 || install_package rabbitmq-server
  answers 5672 && return 0
  # The Debian package may have started it already.
  if ! answers 5672; then
    echo "ensure-services: starting RabbitMQ (rabbitmq-server -detached)" >&2
    rabbitmq-server -detached
  fi
  wait_for 5672 120 RabbitMQ
  if command -v rabbitmqctl >/dev/null 2>&1; then
    rabbitmqctl --timeout 120 await_startup >/dev/null 2>&1 || true
  fi
}

ensure_redis() {
  # redis-server and redis-cli also for the cluster tests' own Sentinel sets and Redis Clusters
  command -v redis-server >/dev/null 2>&1 || install_package redis-server
  command -v redis-cli >/dev/null 2>&1 || install_package redis-tools
  answers 6379 && return 0
  if ! answers 6379; then
    echo "ensure-services: starting Redis" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  fi
  wait_for 6379 30 Redis
}

ensure_wrk() {
  command -v wrk >/dev/null 2>&1 || install_package wrk
}

for service in "$@"; do
  case "$service" in
    rabbitmq) ensure_rabbitmq ;;
    redis) ensure_redis ;;
    wrk) ensure_wrk ;;
    *) echo "ensure-services: unknown service $service" >&2; exit 2 ;;
  esac
done
