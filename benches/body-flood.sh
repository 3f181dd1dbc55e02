#!/bin/bash
# Peak memory of worker binaries under a flood of large request bodies: CONNECTIONS clients at
# once each send `POST /domains/lookup` with `Content-Length: 1048576` and all of the body but
# its last byte, and hold; after HOLD seconds the worker's peak RSS (`VmHWM`) is read, the
# clients close, and a look-up by GET must still be answered meanwhile. One line per binary.
# MODE=trickle: each client sends one byte of its body and holds instead (a slow upload, which
# costs the client nothing); then a small `POST /domains/lookup` is timed: answered at once when
# a stalled body gives its room in the budget back, else only when the stalled requests time out.
# (The bodies a worker holds at once are capped by HTTP_BODY_BUDGET since the commit that added
# this script; the binary before it buffered every body the concurrency cap let in.)
#
#   benches/body-flood.sh BIN [BIN ...]     (CONNECTIONS=300 HOLD=5 MODE=flood by default)
#
# Needs RabbitMQ and Postgres on 127.0.0.1 (`make services`). Deletes what it created.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
connections=${CONNECTIONS:-300} hold=${HOLD:-5} mode=${MODE:-flood}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for bin in "$@"; do
    tag=flood_$$_$(basename "$bin" | tr -c 'a-zA-Z0-9\n' _)
    db=$tag queue=${tag}_q exchange=${tag}_x
    psql -h 127.0.0.1 -U postgres -Atq -c "CREATE DATABASE $db"
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f CATCHALL_EXCHANGE=$exchange \
        CATCHALL_QUEUE=$queue DATABASE_URL=postgres://postgres@127.0.0.1/$db \
        HTTP_ADDR=127.0.0.1:18192 LOG_FORMAT=json "$bin" > "$work/$tag.log" 2>&1 &
    pid=$!
    await_ready 18192 "$bin" "$work/$tag.log"
    before=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    python3 - "$connections" "$hold" "$pid" "$mode" <<'EOF'
import asyncio, sys, time, urllib.error, urllib.request
connections, hold, pid, mode = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
BODY = 1 << 20
head = (f"POST /domains/lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {BODY}\r\n\r\n").encode()
async def client(held):
    reader, writer = await asyncio.open_connection("127.0.0.1", 18192)
    # Not drained: what the worker does not read stays in the kernel's and this process's
    # buffers, which is the point.
    writer.write(head + b" " * (1 if mode == "trickle" else BODY - 1))
    held.append(writer)
async def main():
    held = []
    await asyncio.gather(*(client(held) for _ in range(connections)), return_exceptions=True)
    await asyncio.sleep(hold)
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(None, lambda: urllib.request.urlopen(
        "http://127.0.0.1:18192/domains/example.com", timeout=10).status)
    print(f"held={len(held)} get_during_flood={answer}")
    if mode == "trickle":
        def small_post():
            started = time.monotonic()
            request = urllib.request.Request(
                "http://127.0.0.1:18192/domains/lookup", data=b'{"domains":["example.com"]}',
                headers={"Content-Type": "application/json"})
            try:
                status = urllib.request.urlopen(request, timeout=30).status
            except urllib.error.HTTPError as error:
                status = error.code
            return status, time.monotonic() - started
        status, took = await loop.run_in_executor(None, small_post)
        print(f"small_post_during_trickle={status} in {took:.2f} s")
    for writer in held:
        writer.close()
asyncio.run(main())
EOF
    peak=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    kill -TERM "$pid" && wait "$pid" || true
    echo "$bin connections=$connections peak_rss_mib=$((peak / 1024)) (before the flood $((before / 1024)))"
    drop_run "$queue" "$exchange" "$db"
done
