#!/usr/bin/env python3
"""Writes COUNT ingress entries as raw RESP XADD commands to stdout, for `redis-cli --pipe`.

    gen_backlog.py COUNT [STREAM] [PREFIX] | redis-cli -p PORT --pipe

Each entry has the fields of src/queue/ingress.rs: request_id, user_id (PREFIX<i>, all
distinct), email (<user_id>@bench.example), reply_to "" (nobody waits), enqueued_at (ms).
"""
import sys
import time


def bulk(s: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(s), s)


def main() -> None:
    count = int(sys.argv[1])
    stream = (sys.argv[2] if len(sys.argv) > 2 else "stream:ensure-user").encode()
    prefix = (sys.argv[3] if len(sys.argv) > 3 else "d").encode()
    now = str(int(time.time() * 1000)).encode()
    head = b"*13\r\n" + bulk(b"XADD") + bulk(stream) + bulk(b"*") + bulk(b"request_id")
    mid = bulk(b"user_id")
    tail = bulk(b"reply_to") + bulk(b"") + bulk(b"enqueued_at") + bulk(now)
    out = sys.stdout.buffer
    chunk = []
    for i in range(count):
        rid = b"bench-%026d" % i
        uid = prefix + b"%d" % i
        chunk.append(head + bulk(rid) + mid + bulk(uid) + b"$5\r\nemail\r\n"
                     + bulk(uid + b"@bench.example") + tail)
        if len(chunk) == 10000:
            out.write(b"".join(chunk))
            chunk.clear()
    out.write(b"".join(chunk))
    out.flush()


if __name__ == "__main__":
    main()
