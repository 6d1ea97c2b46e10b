#!/usr/bin/env bash
# Starts or stops a throwaway Debian rabbitmq-server on loopback, used to check
# by hand that the client test suites expect what RabbitMQ really does. Not
# used by ./scripts/test. All state lives in one temp directory.
#
# Usage: scripts/rabbitmq-for-tests.sh start   # prints the AMQP_URL to export
#        scripts/rabbitmq-for-tests.sh stop
#        scripts/rabbitmq-for-tests.sh restart # keeps the data: for durability tests
#        scripts/rabbitmq-for-tests.sh status
# Check the pika suite against it:
#   eval "$(scripts/rabbitmq-for-tests.sh start)"
#   AMQP_RESTART_CMD="scripts/rabbitmq-for-tests.sh restart" scripts/test-pika.sh
# Env:   RABBITMQ_TEST_PORT (default 5672), RABBITMQ_TEST_DIR
#        (default ~/.cache/synod/rabbitmq-for-tests)
set -euo pipefail

port=${RABBITMQ_TEST_PORT:-5672}
base=${RABBITMQ_TEST_DIR:-$HOME/.cache/synod/rabbitmq-for-tests}
bin=/usr/lib/rabbitmq/bin
# How long to wait for the node to boot or stop before giving up.
boot_timeout_s=120

if [ ! -x "$bin/rabbitmq-server" ]; then
    echo "rabbitmq-server is not installed: apt-get install rabbitmq-server" >&2
    exit 1
fi

# Everything RabbitMQ and Erlang write goes under $base; nothing listens
# beyond loopback (AMQP, Erlang distribution and epmd alike).
export HOME=$base/home
export RABBITMQ_NODENAME=synodtest@localhost
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$port
export RABBITMQ_DIST_PORT=$((port + 20000))
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_MNESIA_BASE=$base/mnesia
export RABBITMQ_LOG_BASE=$base/log
export RABBITMQ_PID_FILE=$base/rabbitmq.pid
export RABBITMQ_CONFIG_FILE=$base/rabbitmq
export RABBITMQ_ADVANCED_CONFIG_FILE=$base/advanced.config
export RABBITMQ_ENABLED_PLUGINS_FILE=$base/enabled_plugins
export RABBITMQ_LOGS=$base/log/rabbit.log

amqp_up() {
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}

stop_node() {
    "$bin/rabbitmqctl" -n "$RABBITMQ_NODENAME" stop "$RABBITMQ_PID_FILE" || true
    # Erlang started an epmd daemon for the node; leave none behind unless
    # another Erlang node still uses it.
    if command -v epmd > /dev/null && ! epmd -names 2>/dev/null | grep -q '^name '; then
        epmd -kill > /dev/null 2>&1 || true
    fi
}

start_node() {
    if amqp_up; then
        echo "something already listens on 127.0.0.1:$port" >&2
        exit 1
    fi
    mkdir -p "$HOME" "$RABBITMQ_MNESIA_BASE" "$RABBITMQ_LOG_BASE"
    # No plugin is enabled: AMQP and Erlang distribution are the only listeners.
    cat > "$base/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$port
loopback_users.guest = true
log.file.level = info
CONF
    echo "[]." > "$RABBITMQ_ENABLED_PLUGINS_FILE"
    echo "[]." > "$RABBITMQ_ADVANCED_CONFIG_FILE"
    "$bin/rabbitmq-server" -detached > "$base/log/startup.log" 2>&1 || true
    deadline=$((SECONDS + boot_timeout_s))
    until amqp_up; do
        if [ $SECONDS -ge $deadline ]; then
            echo "rabbitmq-server did not accept connections on 127.0.0.1:$port within ${boot_timeout_s}s; see $base/log" >&2
            exit 1
        fi
        sleep 0.5
    done
}

case "${1:-}" in
start)
    start_node
    echo "export AMQP_URL=amqp://guest:guest@127.0.0.1:$port/"
    ;;
stop)
    stop_node
    ;;
restart)
    stop_node
    start_node
    ;;
status)
    "$bin/rabbitmqctl" -n "$RABBITMQ_NODENAME" status
    ;;
*)
    echo "usage: $0 start|stop|restart|status" >&2
    exit 2
    ;;
esac
