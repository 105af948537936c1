#!/usr/bin/env bash
# open3d needs the system library libusb-1.0 (Debian/Ubuntu package libusb-1.0-0).
# Installs it when missing and we are root; otherwise says exactly what to run.
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "geomreg setup: installing libusb-1.0-0 (needed by open3d)..." >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0 >/dev/null
else
  echo "geomreg setup: open3d needs libusb-1.0, which is missing." >&2
  echo "  Install it first, e.g.: sudo apt-get install libusb-1.0-0  (Debian/Ubuntu)" >&2
  exit 1
fi
