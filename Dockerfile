# gpooler in a small image. Build: docker build -t gpooler .   Run: see docs/docker.md.
#
# The configuration is not baked in: mount a directory holding gpooler.yaml (and any TLS files it
# names, relative to it) at /etc/gpooler, and pass secrets as environment variables that the YAML
# reads with ${NAME}, e.g. -e GPOOLER_ADMIN_PASSWORD=...
FROM python:3.11-slim

LABEL org.opencontainers.image.title="gpooler" \
      org.opencontainers.image.description="Multi-tenant Postgres connection pooler on gevent" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    GPOOLER_CONFIG=/etc/gpooler/gpooler.yaml \
    GPOOLER_HEALTHCHECK_HOST=127.0.0.1 \
    GPOOLER_HEALTHCHECK_PORT=6543

# Only what `pip install .` needs (see .dockerignore); the sources are removed once installed.
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY gpooler ./gpooler
RUN pip install --no-cache-dir . \
    && rm -rf /src \
    && groupadd --system --gid 10001 gpooler \
    && useradd --system --uid 10001 --gid gpooler --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gpooler \
    && mkdir -p /etc/gpooler

WORKDIR /etc/gpooler
VOLUME ["/etc/gpooler"]

# The ports of conf/gpooler.yaml: transaction pooling, session pooling, admin console. Listeners
# must bind 0.0.0.0 (or "::") in the container to be reachable through published ports.
EXPOSE 6543 6542 6544

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# Healthy when the transaction port answers an SSLRequest (8 bytes; gpooler replies "N" or "S"):
# that needs the daemon's event loop, where a bare TCP connect succeeds even on a hung process
# because the kernel completes the handshake. No psql needed; port and host from the env above.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, socket; s = socket.create_connection((os.environ.get('GPOOLER_HEALTHCHECK_HOST', '127.0.0.1'), int(os.environ.get('GPOOLER_HEALTHCHECK_PORT', '6543'))), timeout=3); s.sendall(bytes.fromhex('0000000804d2162f')); raise SystemExit(s.recv(1) not in (b'N', b'S'))"]

# SIGTERM: stop accepting, let running transactions finish within shutdown_timeout, exit 0. Give
# `docker stop -t` (or --stop-timeout) a few seconds more than shutdown_timeout (default 30).
STOPSIGNAL SIGTERM
ENTRYPOINT ["gpooler"]
CMD ["-c", "/etc/gpooler/gpooler.yaml"]
