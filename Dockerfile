# One image for every service: `docker run IMAGE <package>` runs `python -m <package>`
# (http_gateway, admin_api, mqtt_gateway, coap_gateway, provisioning_core, credentials;
# provisioning_common.db migrate and mqtt_gateway.devcert are the one-shot steps).
# Base image pinned by tag (the newest 3.11 patch release); bump both stages together.

FROM python:3.11.16-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# The dependencies first (their layer is rebuilt only when the lock changes): exactly the versions of
# requirements/runtime.txt (make lock), each file checked against the lock's hashes. Wheels only:
# every one ships manylinux wheels for amd64 and arm64, so neither stage needs a compiler.
COPY requirements ./requirements
RUN /opt/venv/bin/pip install --require-hashes --only-binary=:all: -r requirements/runtime.txt
COPY pyproject.toml ./
COPY libs ./libs
COPY services ./services
# Then the project itself, resolving nothing. pip itself is not needed at run time.
RUN /opt/venv/bin/pip install --no-deps --only-binary=:all: . \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM python:3.11.16-slim-bookworm
LABEL org.opencontainers.image.title="iot-provisioning" \
      org.opencontainers.image.description="ThingsBoard-compatible IoT device self-provisioning services"
# A fixed numeric uid/gid, so that Kubernetes' runAsNonRoot can verify it; /tls is where the
# MQTT certificate lives (a compose volume initialised with this owner, or a mounted Secret).
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app \
 && install --directory --owner=10001 --group=10001 --mode=0750 /tls
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# HTTP, admin API, MQTT, MQTTS, CoAP, and HEALTH_PORT of the services without an HTTP port.
EXPOSE 8080 8081 1883 8883 5683/udp 8090
# Every service drains on SIGTERM (bounded by PROVISION_TIMEOUT_S) and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m"]
CMD ["http_gateway"]
