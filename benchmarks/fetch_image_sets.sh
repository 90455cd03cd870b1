#!/usr/bin/env bash
# Fetches the image sets of the pretrained benchmark (benchmarks/image_sets.py) into
# ${NIR_DATA:-~/.cache/nir-loss/data} with the system's package tools; nothing is installed
# system-wide. Needs apt-get (Debian or Ubuntu) and npm.
#   wesnoth: Debian package wesnoth-1.16-data (GPL-2+), unpacked with dpkg-deb.
#   emoji:   npm packages emoji-datasource-{google,twitter,facebook,apple} (Google Apache-2.0,
#            Twitter CC-BY-4.0, Facebook and Apple under their own terms: benchmark use only).
set -euo pipefail
root="${NIR_DATA:-$HOME/.cache/nir-loss/data}"
mkdir -p "$root" && cd "$root"
if [ ! -d wesnoth/usr/share/games/wesnoth ]; then
  apt-get download wesnoth-1.16-data || { apt-get update -q && apt-get download wesnoth-1.16-data; }
  mkdir -p wesnoth && dpkg-deb -x wesnoth-1.16-data_*.deb wesnoth && rm -f wesnoth-1.16-data_*.deb
fi
for vendor in google twitter facebook apple; do
  if [ ! -f "emoji/$vendor/package/emoji.json" ]; then
    tarball=$(npm pack --silent "emoji-datasource-$vendor")
    mkdir -p "emoji/$vendor" && tar xzf "$tarball" -C "emoji/$vendor" && rm -f "$tarball"
  fi
done
echo "image sets in $root"
