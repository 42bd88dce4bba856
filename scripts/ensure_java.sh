#!/usr/bin/env bash
# TorchServe's frontend needs Java 11 or newer.  Install it when we can, else say what to install.
set -euo pipefail
version() { java -version 2>&1 | awk -F'"' '/version/ {print $2}' | awk -F. '{print ($1 == "1") ? $2 : $1}'; }
if command -v java >/dev/null 2>&1 && [ "$(version)" -ge 11 ] 2>/dev/null; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Java 11+ not found: installing openjdk-17-jre-headless" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null
  exit 0
fi
echo "TorchServe needs Java 11 or newer, and none was found." >&2
echo "Install it, e.g. 'sudo apt-get install openjdk-17-jre-headless' (Debian/Ubuntu)," >&2
echo "'sudo dnf install java-17-openjdk-headless' (Fedora/RHEL) or 'brew install openjdk@17' (macOS)." >&2
exit 1
