#!/usr/bin/env python3
"""Mints HS256 tokens in bulk, the way the platform does (`jwt.sign({userId, email}, secret)`:
claims userId, email, iat; no exp), one per line, shuffled with a fixed seed.

    JWT_SECRET=… mint_tokens.py OUT SPEC [SPEC…]

SPEC is `range:PREFIX:START:COUNT` (users PREFIX<START> … PREFIX<START+COUNT-1>) or
`sample:PREFIX:POPULATION:COUNT` (COUNT distinct users drawn from PREFIX<0> …
PREFIX<POPULATION-1>; MINT_SEED, default 1, picks the draw). Emails are
`<userId>@bench.example`. Standard library only: far faster than running `ensure-user token`
once per user.
"""
import base64
import hashlib
import hmac
import json
import os
import random
import sys
import time


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    secret = os.environ["JWT_SECRET"].encode()
    out, specs = sys.argv[1], sys.argv[2:]
    rng = random.Random(int(os.environ.get("MINT_SEED", "1")))
    ids = []
    for spec in specs:
        kind, prefix, a, b = spec.split(":")
        a, b = int(a), int(b)
        if kind == "range":
            ids.extend(f"{prefix}{i}" for i in range(a, a + b))
        elif kind == "sample":
            ids.extend(f"{prefix}{i}" for i in rng.sample(range(a), b))
        else:
            sys.exit(f"unknown spec {spec}")
    rng.shuffle(ids)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    iat = int(time.time())
    with open(out, "wb") as f:
        for user_id in ids:
            claims = {"userId": user_id, "email": f"{user_id}@bench.example", "iat": iat}
            signing_input = header + b"." + b64(json.dumps(claims, separators=(",", ":")).encode())
            sig = b64(hmac.new(secret, signing_input, hashlib.sha256).digest())
            f.write(signing_input + b"." + sig + b"\n")


if __name__ == "__main__":
    main()
