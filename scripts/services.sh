#!/usr/bin/env bash
# The services the test suite needs beyond Python: a throwaway PostgreSQL server and a Redis
# server on loopback, and Debian's chromium for the browser test. `make test` runs `up` before
# pytest and `down` after. Redis is the broker of the Celery run launcher (deploy/celery/).
#
#   scripts/services.sh up      install postgresql / redis-server / chromium if missing
#                               (apt-get), start a private PostgreSQL and a private Redis on
#                               127.0.0.1:<free port>, write their addresses to
#                               .tmp/services/{postgres,redis}.env; servers already up are reused
#   scripts/services.sh down    stop those servers and delete their data directories, unless
#                               another caller's `up` still holds them (`down --force`: stop anyway)
#   scripts/services.sh env     print the address files (KEY=value lines), fail if not up
#
# Several `make test` may share the working tree: each `up` registers its caller (the parent
# process id) as a holder, and `down` stops the server only when no living holder is left.
#
# The server is a cluster of its own (initdb into a temporary directory, fsync off: test data
# only), never the machine's `main` cluster. PostgreSQL refuses to run as root, so as root it
# runs as the `postgres` OS user. The superuser is `crm` with a random password over TCP
# (scram-sha-256), so tests connect exactly as a deployment would: with dlt's
# DESTINATION__POSTGRES__CREDENTIALS=postgresql://crm:<password>@127.0.0.1:<port>/<database>.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="$ROOT/.tmp/services"
PG_STATE="$STATE_DIR/postgres.env"
REDIS_STATE="$STATE_DIR/redis.env"
HOLDERS="$STATE_DIR/holders"
HOLDER="$PPID"  # the process that called us: its `up` and its `down` name the same holder
PG_USER=crm
# the data directory must be reachable by the `postgres` OS user: a world-traversable temp root
TMP_ROOT="${TMPDIR:-/tmp}"

log() { echo "services: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand"
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Debian puts the server binaries in /usr/lib/postgresql/<major>/bin, off PATH; take the newest.
pg_bindir() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
        echo "$dir"; return 0
    fi
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"; return 0
    fi
    return 1
}

ensure_postgresql() {
    if pg_bindir >/dev/null; then return 0; fi
    apt_install postgresql postgresql-client
    # Debian's package creates and may start its own `main` cluster; ours is separate, stop that one
    if command -v pg_lsclusters >/dev/null 2>&1; then
        pg_lsclusters --no-header 2>/dev/null | awk '$4 == "online" {print $1, $2}' |
            while read -r version cluster; do
                as_root pg_ctlcluster "$version" "$cluster" stop || true
            done
    fi
    pg_bindir >/dev/null || die "postgresql was installed but initdb/pg_ctl are still missing"
}

ensure_redis() {
    if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then return 0; fi
    apt_install redis-server
    # Debian's package may start its own server on 6379; ours is separate, stop that one
    if command -v service >/dev/null 2>&1; then as_root service redis-server stop >/dev/null 2>&1 || true; fi
    command -v redis-server >/dev/null 2>&1 || die "redis-server was installed but is still missing"
}

ensure_chromium() {
    if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then return 0; fi
    apt_install chromium fonts-dejavu-core
    [ -x /usr/bin/chromium ] || die "chromium was installed but /usr/bin/chromium is missing"
}

# The OS user the server runs as: ourselves, or `postgres` when we are root.
run_pg() {
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || die "no 'postgres' OS user to run the server as"
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

pg_is_up() {
    [ -f "$PG_STATE" ] || return 1
    (
        # shellcheck disable=SC1090
        . "$PG_STATE"
        [ -f "$CRM_TEST_PG_DATA/postmaster.pid" ] &&
            "$CRM_TEST_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$CRM_TEST_PG_PORT" -t 5
    )
}

SCRAM_ITERATIONS=16
scram_verifier() {  # RFC 5802 / 7677: SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>
    python3 - "$1" "$SCRAM_ITERATIONS" <<'PY'
import base64, hashlib, hmac, os, sys
password, rounds = sys.argv[1].encode(), int(sys.argv[2])
salt = os.urandom(16)
salted = hashlib.pbkdf2_hmac("sha256", password, salt, rounds)
key = lambda name: hmac.new(salted, name, "sha256").digest()
b64 = lambda raw: base64.b64encode(raw).decode()
print(f"SCRAM-SHA-256${rounds}:{b64(salt)}${b64(hashlib.sha256(key(b'Client Key')).digest())}:{b64(key(b'Server Key'))}")
PY
}

postgres_up() {
    if pg_is_up; then
        log "PostgreSQL already running ($(grep '^CRM_TEST_PG_PORT=' "$PG_STATE"))"
        return 0
    fi
    [ -f "$PG_STATE" ] && postgres_down  # a stale one (killed, or the machine restarted)

    local bin data port password pwfile
    bin="$(pg_bindir)"
    data="$(mktemp -d "$TMP_ROOT/crm-test-pg.XXXXXX")"
    password="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
    pwfile="$data.pw"
    # The password's SCRAM verifier, stored as given, with SCRAM_ITERATIONS rounds instead of
    # PostgreSQL's 4096: clients still authenticate with SCRAM-SHA-256, but Dagster's storage opens
    # a connection per query, thousands in a run of the suite, and the client derives the key for
    # each (benchmarks/README.md). A test server's shortcut, like fsync=off.
    scram_verifier "$password" >"$pwfile"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$data" "$pwfile"; fi
    chmod 700 "$data"; chmod 600 "$pwfile"

    log "initdb $data ($("$bin/postgres" --version))"
    run_pg "$bin/initdb" -D "$data" -U "$PG_USER" --pwfile="$pwfile" -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 >"$data.initdb.log" 2>&1 ||
        { cat "$data.initdb.log" >&2; die "initdb failed"; }
    rm -f "$pwfile"

    # A port another process grabs between our probe and the server's bind fails the start: retry.
    local attempt
    for attempt in 1 2 3; do
        port="$(free_port)"
        if run_pg "$bin/pg_ctl" start -D "$data" -w -t 60 -l "$data/server.log" -o \
            "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$data \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100" \
            >/dev/null 9>&-; then
            break
        fi
        tail -n 20 "$data/server.log" >&2 || true
        [ "$attempt" = 3 ] && die "PostgreSQL did not start (log above)"
    done

    mkdir -p "$STATE_DIR"
    umask 077
    cat >"$PG_STATE" <<EOF
CRM_TEST_PG_HOST=127.0.0.1
CRM_TEST_PG_PORT=$port
CRM_TEST_PG_USER=$PG_USER
CRM_TEST_PG_PASSWORD=$password
CRM_TEST_PG_DATA=$data
CRM_TEST_PG_BIN=$bin
EOF
    log "PostgreSQL up on 127.0.0.1:$port (data $data)"
}

postgres_down() {
    [ -f "$PG_STATE" ] || { log "PostgreSQL: nothing to stop"; return 0; }
    local data bin
    data="$(sed -n 's/^CRM_TEST_PG_DATA=//p' "$PG_STATE")"
    bin="$(sed -n 's/^CRM_TEST_PG_BIN=//p' "$PG_STATE")"
    if [ -n "$data" ] && [ -d "$data" ]; then
        run_pg "$bin/pg_ctl" stop -D "$data" -m fast -w -t 60 >/dev/null 2>&1 || true
        case "$data" in */crm-test-pg.*) rm -rf "$data" "$data.initdb.log" ;; esac
    fi
    rm -f "$PG_STATE"
    log "PostgreSQL stopped"
}

redis_cli() {  # redis_cli PORT PASSWORD ARGS...: the password through the environment, not argv
    local port="$1" password="$2"
    shift 2
    REDISCLI_AUTH="$password" redis-cli -h 127.0.0.1 -p "$port" "$@"
}

redis_is_up() {
    [ -f "$REDIS_STATE" ] || return 1
    (
        # shellcheck disable=SC1090
        . "$REDIS_STATE"
        [ "$(redis_cli "$CRM_TEST_REDIS_PORT" "$CRM_TEST_REDIS_PASSWORD" ping 2>/dev/null)" = PONG ]
    )
}

wait_for_redis() {  # wait_for_redis PORT PASSWORD
    local try
    for try in $(seq 50); do
        [ "$(redis_cli "$1" "$2" ping 2>/dev/null)" = PONG ] && return 0
        sleep 0.1
    done
    return 1
}

# A Redis of its own: no persistence (the queue holds test runs only), a password like a
# deployment's, its files in a private directory.
redis_up() {
    if redis_is_up; then
        log "Redis already running ($(grep '^CRM_TEST_REDIS_PORT=' "$REDIS_STATE"))"
        return 0
    fi
    [ -f "$REDIS_STATE" ] && redis_down  # a stale one

    local data port password attempt
    data="$(mktemp -d "$TMP_ROOT/crm-test-redis.XXXXXX")"
    chmod 700 "$data"
    password="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
    for attempt in 1 2 3; do
        port="$(free_port)"
        # the password goes in through stdin (a one-line config file), not the command line
        if printf 'requirepass %s\n' "$password" | redis-server - --bind 127.0.0.1 --port "$port" \
            --dir "$data" --daemonize yes --pidfile "$data/redis.pid" --logfile "$data/redis.log" \
            --save '' --appendonly no >/dev/null 9>&- && wait_for_redis "$port" "$password"; then
            break
        fi
        tail -n 20 "$data/redis.log" >&2 || true
        [ "$attempt" = 3 ] && die "Redis did not start (log above)"
    done

    mkdir -p "$STATE_DIR"
    (
        umask 077
        cat >"$REDIS_STATE" <<EOF
CRM_TEST_REDIS_HOST=127.0.0.1
CRM_TEST_REDIS_PORT=$port
CRM_TEST_REDIS_PASSWORD=$password
CRM_TEST_REDIS_DATA=$data
EOF
    )
    log "Redis up on 127.0.0.1:$port (data $data)"
}

redis_down() {
    [ -f "$REDIS_STATE" ] || { log "Redis: nothing to stop"; return 0; }
    local data port password pid
    data="$(sed -n 's/^CRM_TEST_REDIS_DATA=//p' "$REDIS_STATE")"
    port="$(sed -n 's/^CRM_TEST_REDIS_PORT=//p' "$REDIS_STATE")"
    password="$(sed -n 's/^CRM_TEST_REDIS_PASSWORD=//p' "$REDIS_STATE")"
    if [ -n "$data" ] && [ -d "$data" ]; then
        redis_cli "$port" "$password" shutdown nosave >/dev/null 2>&1 || true
        # the server we started, by its pid file, if it did not answer
        pid="$(cat "$data/redis.pid" 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
        case "$data" in */crm-test-redis.*) rm -rf "$data" ;; esac
    fi
    rm -f "$REDIS_STATE"
    log "Redis stopped"
}


# one `up` or `down` at a time in this working tree (the server started meanwhile must not inherit
# the lock's descriptor: it would hold the lock for as long as it runs)
lock() {
    mkdir -p "$HOLDERS"
    exec 9>"$STATE_DIR/.lock"
    flock 9
}

# the holders whose process still lives (the others are forgotten)
living_holders() {
    local file
    for file in "$HOLDERS"/*; do
        [ -e "$file" ] || continue
        if kill -0 "${file##*/}" 2>/dev/null; then echo "${file##*/}"; else rm -f "$file"; fi
    done
}

case "${1:-}" in
    up)
        ensure_postgresql
        ensure_redis
        ensure_chromium
        lock
        postgres_up
        redis_up
        touch "$HOLDERS/$HOLDER"
        ;;
    down)
        lock
        rm -f "$HOLDERS/$HOLDER"
        others="$(living_holders | wc -l)"
        if [ "${2:-}" != --force ] && [ "$others" -gt 0 ]; then
            log "PostgreSQL and Redis left running: $others other caller(s) still use them"
        else
            postgres_down
            redis_down
            rm -f "$HOLDERS"/*
        fi
        ;;
    env)
        pg_is_up || die "PostgreSQL is not running: run scripts/services.sh up"
        redis_is_up || die "Redis is not running: run scripts/services.sh up"
        cat "$PG_STATE" "$REDIS_STATE"
        ;;
    *)
        echo "usage: $0 up|down [--force]|env" >&2
        exit 2
        ;;
esac
