# Sourced by scripts/*: make sure .venv exists with livemig and its test tools,
# and that the QEMU tools the tests use as oracles are installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e ".[test,bench]"
  touch "$stamp"
fi
need_apt() {
  # $1: command that must exist, $2: Debian package providing it
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian package $2 (for $1)" >&2
    if [ -z "${_LIVEMIG_APT_UPDATED:-}" ]; then
      apt-get update -qq >/dev/null
      _LIVEMIG_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  else
    echo "warning: $1 missing; install Debian package $2 (tests needing it are skipped)" >&2
  fi
}
export PATH="$ROOT/.venv/bin:$PATH"
