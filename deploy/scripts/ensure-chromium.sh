#!/usr/bin/env bash
# Make sure a Chromium for the status page's browser tests is installed: Debian's `chromium`
# package (Playwright drives it through executable_path; it never downloads a browser of its
# own). Installs it with apt-get when it is missing and we are root; $RELAY_TEST_CHROMIUM may
# name another Chromium binary instead.
#
# usage: deploy/scripts/ensure-chromium.sh
set -euo pipefail

if [ -n "${RELAY_TEST_CHROMIUM:-}" ]; then
  [ -x "$RELAY_TEST_CHROMIUM" ] && exit 0
  echo "ensure-chromium: RELAY_TEST_CHROMIUM=$RELAY_TEST_CHROMIUM is not an executable" >&2
  exit 1
fi
command -v chromium >/dev/null 2>&1 && exit 0

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "ensure-chromium: installing chromium with apt-get" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
  command -v chromium >/dev/null 2>&1 && exit 0
fi
echo "ensure-chromium: chromium is not installed; install it (Debian: sudo apt-get install chromium)" >&2
echo "ensure-chromium: or set RELAY_TEST_CHROMIUM to a Chromium binary" >&2
exit 1
