#!/usr/bin/env bash
# ksmlens set-up for a fresh Debian 12 machine (run as root, or with sudo).
#
#   ./setup.sh          install everything, then run the main job:
#                       build + boot the default kernel variant, run the
#                       mremap scenario, print the kernel's KSM counters;
#                       then execute notebooks/*.ipynb against a VM into
#                       out/notebooks/*.html (and the executed *.ipynb), and
#                       build them as a static site, the book: out/book/
#   ./setup.sh --deps   install only (what .ci/run uses)
#
# Installs Debian packages (kernel source, QEMU, build tools), creates the
# git-ignored venv .venv/ with ksmlens in editable mode and pyproject.toml's
# pinned dependencies (drgn, the notebooks' Jupyter, the book's Sphinx +
# myst-nb + sphinx-book-theme, selenium for the browser tests); `ksmlens` is then
# .venv/bin/ksmlens. Kernel builds are cached in ~/.cache/ksmlens.
set -euo pipefail
cd "$(dirname "$0")"

APT_PKGS=(
  linux-source-6.12 linux-source-6.1 qemu-system-x86 qemu-utils
  build-essential libc6-dev bc flex bison libelf-dev libssl-dev dwarves cpio
  patch xz-utils kmod rsync util-linux procps python3-venv python3-dev
  # libnuma.a for the kernel's ksm_tests (`ksmlens selftests`, linked statically)
  libnuma-dev
  # Debian's browser and its WebDriver, for tests/views/test_browser.py (no browser download)
  chromium chromium-driver
  # the arm64 lab (--arch arm64): the cross compiler (kernel and guest programs,
  # static glibc from libc6-dev-arm64-cross), the emulator, and debootstrap for
  # the guest's Debian root
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-system-arm debootstrap
)

missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# pyproject.toml pins every dependency exactly (==): pip installs those
# versions or fails; say so in one line after its own message
if ! .venv/bin/python -m pip install -q -e '.[test]'; then
  echo "setup: error: pip could not install pyproject.toml's pinned packages (its message is above): is PyPI reachable, and does it still serve those versions?" >&2
  exit 1
fi
echo "setup: ksmlens is .venv/bin/ksmlens"

if [ "${1:-}" = "--deps" ]; then
  exit 0
fi
.venv/bin/ksmlens demo
# The notebooks, executed top to bottom against the default VM (booted for
# them and powered off after, or reused if it is up), then the book of them.
.venv/bin/ksmlens notebooks --book out/book
echo "setup: done. The executed notebooks: $(pwd)/out/notebooks/*.html, and as a book:"
echo "setup: $(pwd)/out/book/index.html (open them in a browser)."
echo "setup: to run them yourself: .venv/bin/jupyter lab notebooks/  (it prints a"
echo "setup: http://localhost:8888/lab?token=... link; as root add --allow-root)"
