#!/usr/bin/env bash
# Install everything the tests need into .venv (plus Debian's chromium for the
# browser tests and static figure export), then run lint, unit, app and browser tests.
# Extra arguments go to pytest (for example -k batchnorm).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh" requirements-dev.txt

if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  elif command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  fi
fi

ruff check .
ruff format --check .
python -m pytest "$@"
