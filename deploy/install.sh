#!/usr/bin/env bash
# Install retm-relay on a Linux VM (Debian, Ubuntu, RHEL ...), from the project directory this
# script lives in. Idempotent: run it again to upgrade; it never overwrites your configuration.
#
#   sudo deploy/install.sh                      install or upgrade (pip runs again only when
#                                               the source changed; --reinstall forces it)
#   sudo deploy/install.sh --uninstall          remove the service and the program; keep
#                                               /etc/retm-relay and the state directory
#   sudo deploy/install.sh --uninstall --purge  remove those too
#   deploy/install.sh --root /tmp/scratch       install into a scratch root (tests, packaging):
#                                               no systemctl, no group, paths under DIR
#
# What it installs:
#   /opt/retm-relay/venv                 a virtual environment with the relay (pip install)
#   /opt/retm-relay/README.md, docs/     the README and the documentation (docs/operators.md is
#                                        the operator guide), and relay.example.toml
#   /etc/retm-relay/relay.toml           from config/relay.example.toml, only if absent (0640)
#   /etc/retm-relay/relay.env            secrets for systemd's EnvironmentFile, only if absent
#                                        (0600), with a fresh random webhook token
#   /etc/retm-relay/tls/                 for http.tls_cert and http.tls_key (0750)
#   /etc/systemd/system/retm-relay.service
#   /var/lib/retm-relay                  the state directory (systemd takes it over: DynamicUser=)
# and the system group retm-relay (the service's Group=, so files can be root:retm-relay 0640),
# then systemctl daemon-reload and enable. It does not start the relay: edit the configuration
# first, then `systemctl start retm-relay`. An upgrade restarts a running relay.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${DESTDIR:-}
PYTHON=${PYTHON:-python3}
ACTION=install
PURGE=no
REINSTALL=no
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=${2:?--root needs a directory}; shift ;;
    --root=*) ROOT=${1#--root=} ;;
    --python) PYTHON=${2:?--python needs an interpreter}; shift ;;
    --python=*) PYTHON=${1#--python=} ;;
    --uninstall) ACTION=uninstall ;;
    --purge) PURGE=yes ;;
    --reinstall) REINSTALL=yes ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$PURGE" = yes ] && [ "$ACTION" != uninstall ]; then
  echo "install.sh: --purge goes with --uninstall" >&2
  exit 2
fi

ROOT=${ROOT%/}
if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" = / ] && ROOT=""
fi
SCRATCH=no
[ -n "$ROOT" ] && SCRATCH=yes

PREFIX=$ROOT/opt/retm-relay
ETC=$ROOT/etc/retm-relay
UNIT=$ROOT/etc/systemd/system/retm-relay.service
STATE=$ROOT/var/lib/retm-relay
PRIVATE_STATE=$ROOT/var/lib/private/retm-relay
GROUP=retm-relay

say() { echo "retm-relay install: $*"; }

if [ "$SCRATCH" = no ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo), or use --root DIR for a scratch root" >&2
  exit 1
fi

# systemctl only on the real root of a machine booted with systemd.
with_systemd() { [ "$SCRATCH" = no ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

systemctl_or_skip() {
  if with_systemd; then
    systemctl "$@"
  else
    say "skipped: systemctl $* ($([ "$SCRATCH" = yes ] && echo "scratch root" || echo "systemd is not running"))"
  fi
}

group_exists() { getent group "$GROUP" >/dev/null 2>&1; }

# chgrp_if_real FILE: root:retm-relay on the real system; scratch roots keep the caller's group.
chgrp_if_real() {
  if [ "$SCRATCH" = no ] && group_exists; then chgrp "$GROUP" "$@"; fi
}

install_relay() {
  "$PYTHON" - <<'EOF' || { echo "install.sh: $PYTHON must be Python 3.11 or newer" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
EOF

  if [ "$SCRATCH" = no ] && ! group_exists; then
    groupadd --system "$GROUP"
    say "created system group $GROUP"
  fi

  # The program: a virtual environment with the relay and its dependencies.
  mkdir -p "$PREFIX"
  if [ ! -x "$PREFIX/venv/bin/python" ]; then
    "$PYTHON" -m venv "$PREFIX/venv"
    say "created $PREFIX/venv"
  fi
  # The same source as last time and a working program: nothing to do (--reinstall forces).
  local source_id build
  source_id=$(cd "$SRC" && find pyproject.toml README.md relay -type f ! -path '*/__pycache__/*' \
    -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)
  if [ "$REINSTALL" = no ] && [ "$(cat "$PREFIX/.source-sha256" 2>/dev/null)" = "$source_id" ] &&
    "$PREFIX/venv/bin/retm-relay" --version >/dev/null 2>&1; then
    say "kept $("$PREFIX/venv/bin/retm-relay" --version) in $PREFIX/venv (same source)"
  else
    # Build from a copy, so that the project directory gets no build/ or egg-info (and may be
    # read-only).
    build=$(mktemp -d)
    tar -C "$SRC" --exclude=__pycache__ -cf - pyproject.toml README.md relay | tar -C "$build" -xf -
    "$PREFIX/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$build"
    rm -rf "$build"
    echo "$source_id" >"$PREFIX/.source-sha256"
    say "installed $("$PREFIX/venv/bin/retm-relay" --version) into $PREFIX/venv"
  fi
  install -m 0644 "$SRC/README.md" "$PREFIX/README.md"
  rm -rf "$PREFIX/docs"
  tar -C "$SRC" -cf - docs | tar -C "$PREFIX" --no-same-owner -xf -
  install -m 0644 "$SRC/config/relay.example.toml" "$PREFIX/relay.example.toml"

  # The configuration: written once, then the operator's.
  install -d -m 0750 "$ETC" "$ETC/tls"
  chgrp_if_real "$ETC" "$ETC/tls"
  if [ ! -e "$ETC/relay.toml" ]; then
    install -m 0640 "$SRC/config/relay.example.toml" "$ETC/relay.toml"
    chgrp_if_real "$ETC/relay.toml"
    say "wrote $ETC/relay.toml from the example"
  else
    say "kept $ETC/relay.toml"
  fi
  if [ ! -e "$ETC/relay.env" ]; then
    local token
    token=$("$PREFIX/venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))')
    (
      umask 077
      cat >"$ETC/relay.env" <<EOF
# Secrets of retm-relay, read by systemd (EnvironmentFile=) as root: keep this file 0600.
# One VARIABLE=value a line; see /opt/retm-relay/docs/configuration.md for every setting.
#
# The Bearer token(s) RETM sends on every webhook: the token your RETM app returns at install.
# Comma-separated for rotation; business:token binds a token to one merchant.
RELAY_AUTH_TOKENS=$token
#
# The broker, with its credentials (amqps:// for TLS):
# RELAY_AMQP_URL=amqp://retm-relay:CHANGE-ME@127.0.0.1:5672/
EOF
    )
    chmod 0600 "$ETC/relay.env"
    say "wrote $ETC/relay.env with a new random webhook token (RELAY_AUTH_TOKENS)"
  else
    say "kept $ETC/relay.env"
  fi

  # The state directory. With DynamicUser=yes systemd keeps it in /var/lib/private/retm-relay
  # behind a /var/lib/retm-relay symlink, moving a plain directory there at the first start.
  if [ ! -e "$STATE" ] && [ ! -e "$PRIVATE_STATE" ]; then
    install -d -m 0700 "$STATE"
    say "created $STATE"
  fi

  # The service.
  install -d -m 0755 "$(dirname "$UNIT")"
  install -m 0644 "$SRC/systemd/retm-relay.service" "$UNIT"
  say "installed $UNIT"
  systemctl_or_skip daemon-reload
  systemctl_or_skip enable retm-relay.service
  systemctl_or_skip try-restart retm-relay.service

  cat <<EOF

Next steps:
  1. Edit $ETC/relay.toml (the broker, TLS: http.tls_cert and http.tls_key in $ETC/tls/,
     or keep 127.0.0.1 behind nginx: deploy/nginx/retm-relay.conf) and $ETC/relay.env.
  2. Check it:   sh -c 'set -a; . $ETC/relay.env; exec $PREFIX/venv/bin/retm-relay check-config --config $ETC/relay.toml'
  3. Start it:   systemctl start retm-relay && systemctl status retm-relay
  4. Register https://YOUR-HOST/retm/events and /retm/errors in RETM with the token.
EOF
}

uninstall_relay() {
  if [ -e "$UNIT" ]; then
    systemctl_or_skip disable --now retm-relay.service
    rm -f "$UNIT"
    systemctl_or_skip daemon-reload
    say "removed $UNIT"
  fi
  if [ -e "$PREFIX" ]; then
    rm -rf "${PREFIX:?}"
    say "removed $PREFIX"
  fi
  if [ "$PURGE" = yes ]; then
    rm -rf "${ETC:?}" "${STATE:?}" "${PRIVATE_STATE:?}"
    say "purged $ETC and the state directory"
    if [ "$SCRATCH" = no ] && group_exists; then
      groupdel "$GROUP"
      say "removed system group $GROUP"
    fi
  else
    say "kept $ETC and the state directory (--purge removes them)"
  fi
}

if [ "$ACTION" = install ]; then install_relay; else uninstall_relay; fi
