# outbox-relay: the relay daemon with every built-in adapter (the `all` extra).
#
#   docker build -t outbox-relay .          # or: scripts/image (podman, no daemon, no registry)
#   docker run --read-only -e DATABASE_URL=... \
#       -v "$PWD/relay.yaml:/etc/outbox-relay/relay.yaml:ro" -p 9187:9187 outbox-relay
#
# Three stages on the same BASE_IMAGE, any image with python3 3.11 and its venv module
# (the official slim image, or the Debian 12 base scripts/image makes from Debian's
# packages): `build` makes the wheels; `install` installs them, offline, into a venv
# on the bare runtime base; the runtime stage takes that venv and nothing else (the venv
# has no pip, no wheels, no build tools; the official python base keeps its own pip in
# /usr/local, the Debian base of scripts/image has none). (A RUN --mount of the wheels
# would save the middle stage, but the buildah of Debian 12 mounts a stage that came
# from the layer cache empty: containers/buildah#4375.)
#
# Dependencies come from docker/requirements.lock (exact versions, every file hashed;
# `scripts/image lock` regenerates it), and only as wheels: nothing is compiled, and a
# rebuild installs the same versions. Behind a TLS-intercepting proxy, hand pip the
# CA bundle as a build secret (docker build --secret id=pip_cert,src=/path/ca.crt;
# scripts/image does it from PIP_CERT); without it pip uses its own.

ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY docker/requirements.lock docker/build-requirements.lock ./docker/
# The wheels of every dependency (downloaded, hash-checked) and the build tools.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --only-binary=:all: -r docker/build-requirements.lock \
    && /opt/build/bin/pip wheel --require-hashes --only-binary=:all: --wheel-dir /wheels -r docker/requirements.lock
COPY pyproject.toml README.md ./
COPY outbox_relay ./outbox_relay
COPY schema ./schema
COPY adapters ./adapters
# The project's own wheel, built with the pinned setuptools and wheel, offline.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --no-index --wheel-dir /wheels .

FROM ${BASE_IMAGE} AS install
ARG VERSION=0.1.0
ENV PYTHONDONTWRITEBYTECODE=1
COPY --from=build /wheels /wheels
# Offline, from the wheels alone (VERSION must be pyproject.toml's), compiled to
# bytecode at install so that nothing is written at run time; pip and setuptools leave
# the venv afterwards.
RUN python3 -m venv /opt/outbox-relay \
    && /opt/outbox-relay/bin/pip install --no-cache-dir --disable-pip-version-check --no-index \
        --find-links /wheels "outbox-relay[all]==${VERSION}" \
    && /opt/outbox-relay/bin/pip uninstall --yes --disable-pip-version-check pip setuptools

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="outbox-relay" \
      org.opencontainers.image.description="Transactional outbox relay for PostgreSQL: publishes outbox rows to brokers, at least once, in per-key order." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
ENV LANG=C.UTF-8 \
    PATH=/opt/outbox-relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OUTBOX_RELAY_CONFIG=/etc/outbox-relay/relay.yaml
# A user with a fixed uid and gid (10001): numeric, so that a cluster can check
# runAsNonRoot, and with no home and no shell. The config goes in /etc/outbox-relay
# (mounted); a file sink writes under /var/lib/outbox-relay (mount a volume there).
RUN groupadd --gid 10001 outbox-relay \
    && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin outbox-relay \
    && install -d -m 0755 /etc/outbox-relay \
    && install -d -m 0750 -o 10001 -g 10001 /var/lib/outbox-relay
COPY --from=install /opt/outbox-relay /opt/outbox-relay
RUN outbox-relay --help >/dev/null
# Secrets come from ${VAR}s in the config, set in the environment. Nothing is written
# but to /tmp, declared a volume for a read-only root filesystem, and to what the
# config names (a file sink's path).
WORKDIR /var/lib/outbox-relay
VOLUME ["/tmp"]
USER 10001:10001
# /livez, /readyz and /metrics (http.port).
EXPOSE 9187
# exec form: the relay is PID 1 and gets SIGTERM itself; it drains in-flight batches
# (bounded by relay.shutdown_timeout) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["outbox-relay"]
CMD ["run", "--config", "/etc/outbox-relay/relay.yaml"]
