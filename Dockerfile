# syntax=docker/dockerfile:1
# hyperrec server image. CPU by default; `--build-arg EXTRAS=gpu` adds the GPU extra.
# Model versions are mounted at /srv/model_repo (see docs/model-bundle.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hyperrec ./hyperrec
COPY server ./server
COPY index ./index
COPY training ./training
COPY loadtest ./loadtest
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip setuptools wheel \
    && if [ -n "$EXTRAS" ]; then /opt/venv/bin/pip install ".[${EXTRAS}]"; else /opt/venv/bin/pip install .; fi

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 hyperrec && useradd --system --uid 10001 --gid hyperrec --home-dir /srv --shell /usr/sbin/nologin hyperrec
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HYPERREC_HOST=0.0.0.0 \
    HYPERREC_PORT=50051 \
    HYPERREC_MODEL_REPO=/srv/model_repo
WORKDIR /srv
RUN mkdir -p /srv/model_repo && chown hyperrec:hyperrec /srv/model_repo
USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('127.0.0.1:50051'); r = g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=2); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["hyperrec"]
CMD ["serve"]
