# Production image with all tollgate binaries. Built by docker-compose.yml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --bins -p tollgate-edge -p tollgate-ingest -p tollgate-aggregator -p tollgate-billing -p tollgate-demo

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tollgate-edge /src/target/release/tollgate-ingest /src/target/release/tollgate-aggregator /src/target/release/tollgate-billing /src/target/release/tollgate-demo /usr/local/bin/
USER 65534
