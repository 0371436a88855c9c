#!/usr/bin/env bash
# CI helper (sourced by .ci/run): install and start a loopback PostgreSQL so the reader-study tests
# also run against it. Best effort: without it those tests skip with a reason.
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: not root; PostgreSQL tests will be skipped" >&2
  return 0 2>/dev/null || exit 0
fi
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "installing PostgreSQL for the reader-study tests..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
    || { echo "warning: could not install postgresql; its tests will be skipped" >&2; return 0 2>/dev/null || exit 0; }
fi
PG_VERSION="$(ls /usr/lib/postgresql | sort -V | tail -1)"
pg_ctlcluster "$PG_VERSION" main start 2>/dev/null || true
for _ in $(seq 1 20); do
  su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1 && break
  sleep 0.5
done
if su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'synthcxr-ci'\"" >/dev/null 2>&1; then
  export SYNTHCXR_TEST_POSTGRES_URL="postgresql://postgres:synthcxr-ci@127.0.0.1:5432/postgres"
  echo "PostgreSQL $PG_VERSION running on 127.0.0.1:5432 for the study tests"
else
  echo "warning: PostgreSQL did not start; its tests will be skipped" >&2
fi
