#!/usr/bin/env bash
# Installs Debian command-line tools some tests check files with: dicom3tools (`dciodvfy`, the reference
# DICOM validator, for the generated DICOM files). Best effort: without root or apt-get the tests that
# need a tool skip with a reason.
set -u
missing=()
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian ${missing[*]} for tests..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
    || echo "warning: could not install ${missing[*]}; the tests that need it will be skipped" >&2
else
  echo "note: ${missing[*]} not installed and cannot apt-get install it (need root); the tests that need it will be skipped" >&2
fi
exit 0
