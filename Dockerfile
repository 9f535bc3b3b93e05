# syntax=docker/dockerfile:1
# Multi-stage: build with the Rust toolchain, run on a slim Debian as a non-root user.

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
# The manifest names the benchmark's example; cargo wants its file even when not building it.
COPY bench/limit_server.rs bench/
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
    && strip target/release/ensure-user

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --create-home --home-dir /app ensure \
    && mkdir -p /app/data && chown ensure:ensure /app/data
COPY --from=build /src/target/release/ensure-user /usr/local/bin/ensure-user
USER ensure
WORKDIR /app
ENV DATABASE_PATH=/app/data/ensure-user.db \
    LISTEN_ADDR=0.0.0.0:8000 \
    METRICS_ADDR=0.0.0.0:9100
EXPOSE 8000 9100 9101
VOLUME ["/app/data"]
# bash's /dev/tcp: the slim image has no curl, and the check needs nothing else.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8000 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q '200 OK' <&3"]
ENTRYPOINT ["ensure-user"]
CMD ["serve"]
