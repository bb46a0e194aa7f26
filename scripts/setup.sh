#!/usr/bin/env bash
# Install dispatch into ./.venv (idempotent). With --system, also install the programs the tests
# drive for real (git, tmux, chromium, redis-server, bubblewrap) from Debian's packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_system=0
[ "${1:-}" = "--system" ] && need_system=1

if [ "$need_system" = 1 ]; then
  missing=()
  command -v git >/dev/null || missing+=(git)
  command -v tmux >/dev/null || missing+=(tmux)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v bwrap >/dev/null || missing+=(bubblewrap)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup: installing ${missing[*]} (apt-get)" >&2
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "setup: missing ${missing[*]}; install them with your package manager (tests needing them will skip)" >&2
    fi
  fi
fi

PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "dispatch needs Python 3.11+"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# quiet unless something fails; the log says what pip did
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' >.venv/setup.log 2>&1; then
  cat .venv/setup.log >&2
  exit 1
fi
