# syntax=docker/dockerfile:1
# The steward binary: `docker build -t steward .`, or `docker compose up --build` (docker-compose.yml).

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target/ between builds; the binary is copied out of the
# cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p steward \
    && cp target/release/steward /usr/local/bin/steward

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin steward
COPY --from=builder /usr/local/bin/steward /usr/local/bin/steward
USER steward
# /metrics, /healthz, /readyz, /leader: listen on every interface inside a container.
ENV STEWARD_METRICS_ADDR=0.0.0.0:9464 \
    STEWARD_LOG_FORMAT=json
EXPOSE 9464
# The binary probes itself (no curl in the image): /healthz on STEWARD_METRICS_ADDR.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s CMD ["steward", "health"]
# SIGTERM steps down cleanly (the running statement is finished or cancelled, the lock released).
STOPSIGNAL SIGTERM
ENTRYPOINT ["steward"]
CMD ["run"]
