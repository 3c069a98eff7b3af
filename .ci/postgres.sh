# Source this file: it starts a throwaway PostgreSQL on 127.0.0.1:${SKINLESION_PG_PORT:-55432} (installing
# Debian's package first if there is none), exports SKINLESION_TEST_POSTGRES for the tests that need a
# real server, and stops and removes it when the shell exits.
#
#     source .ci/postgres.sh && make test
_pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(_pg_bin)" ]; then
    if [ "$(id -u)" = 0 ]; then _sudo=""; else _sudo="sudo"; fi
    $_sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -qq postgresql >/dev/null
fi
_pg="$(_pg_bin)"
_pg_dir="$(mktemp -d /tmp/skinlesion-pg.XXXXXX)"
_pg_port="${SKINLESION_PG_PORT:-55432}"
if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root
    chown postgres "$_pg_dir"
    _pg_as() { runuser -u postgres -- "$@"; }
else
    _pg_as() { "$@"; }
fi
_pg_as "$_pg/initdb" -D "$_pg_dir/data" -A trust -U postgres >/dev/null
_pg_as "$_pg/pg_ctl" -D "$_pg_dir/data" -l "$_pg_dir/log" -w \
    -o "-h 127.0.0.1 -p $_pg_port -k $_pg_dir -c max_connections=200 -c fsync=off" start >/dev/null
export SKINLESION_TEST_POSTGRES="postgresql://postgres@127.0.0.1:$_pg_port/postgres"
trap '_pg_as "$_pg/pg_ctl" -D "$_pg_dir/data" -m fast stop >/dev/null; rm -rf "$_pg_dir"' EXIT
echo "PostgreSQL ($("$_pg/postgres" --version)) on 127.0.0.1:$_pg_port: SKINLESION_TEST_POSTGRES=$SKINLESION_TEST_POSTGRES"
