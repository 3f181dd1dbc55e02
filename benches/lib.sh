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
