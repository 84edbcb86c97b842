#!/usr/bin/env bash
# Make the checkers of the deployment kit available to the tests: promtool (Debian package
# prometheus) checks and unit-tests the alert rules, nginx (Debian package nginx) checks and runs
# the TLS-termination example, haproxy (Debian package haproxy) checks the load-balancer example
# for several relays (its libraries liblua5.3-0, libopentracing-c-wrapper0 and libopentracing1
# are unpacked with it when missing; the tests run it with DIR/usr/lib/<arch> on the library
# path).
#
# A tool already on PATH is used as it is. Otherwise the Debian package is fetched with
# `apt-get download` and unpacked with `dpkg-deb -x` into DIR (default .venv/tools), so nothing
# is installed system-wide and no daemon is started (installing the prometheus package would
# start a Prometheus server on a VM). The tests look in DIR/usr/bin and DIR/usr/sbin.
#
# usage: deploy/scripts/ensure-tools.sh [DIR]
set -euo pipefail

DIR=${1:-.venv/tools}

have() {  # have TOOL: on PATH (sbin included) or already unpacked into DIR
  PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1 ||
    [ -x "$DIR/usr/bin/$1" ] || [ -x "$DIR/usr/sbin/$1" ]
}

unpack() {  # unpack PACKAGE: apt-get download it and extract it into DIR
  local package=$1 work
  if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "ensure-tools: $package is needed and this is not Debian: install $2 by hand" >&2
    return 1
  fi
  work=$(mktemp -d)
  echo "ensure-tools: unpacking Debian's $package into $DIR" >&2
  if ! (cd "$work" && apt-get download -q "$package" >/dev/null 2>&1); then
    if [ "$(id -u)" -eq 0 ]; then
      apt-get update -q >/dev/null
      (cd "$work" && apt-get download -q "$package" >/dev/null)
    else
      echo "ensure-tools: apt-get download $package failed; run apt-get update as root" >&2
      rm -rf "$work"
      return 1
    fi
  fi
  mkdir -p "$DIR"
  dpkg-deb -x "$work"/"$package"_*.deb "$DIR"
  rm -rf "$work"
}

have promtool || unpack prometheus promtool
have nginx || unpack nginx nginx
if ! have haproxy; then
  for package in haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1; do
    unpack "$package" haproxy
  done
fi
