# Shared by the A/B scripts of benches/ (sourced): what one run of a worker leaves behind.

# drop_run QUEUE EXCHANGE DB: deletes the run's queue and its dead-letter queue, every exchange
# whose name starts with EXCHANGE (the events exchange and its dead-letter exchange), and DB.
drop_run() {
    local queue=$1 exchange=$2 db=$3 q x
    for q in "$queue" "$queue.dead"; do rabbitmqctl -q delete_queue "$q" > /dev/null 2>&1 || true; done
    for x in $(rabbitmqctl -q list_exchanges name | grep "^$exchange" || true); do
        rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$x\">>), false, <<\"bench\">>)." > /dev/null
    done
    psql -h 127.0.0.1 -U postgres -Atq -c "DROP DATABASE $db WITH (FORCE)"
}

# await_ready PORT BIN LOG: waits up to 30 s for the worker BIN on 127.0.0.1:PORT to answer
# /readyz; fails the script (pointing at LOG) if it does not.
await_ready() {
    local port=$1 bin=$2 log=$3
    for _ in $(seq 1 300); do
        curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && return 0
        sleep 0.1
    done
    echo "the worker $bin did not become ready: $log" >&2
    exit 1
}
