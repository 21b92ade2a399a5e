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
# The gpu extra's onnxruntime-gpu and faiss-gpu provide the same modules as the default CPU builds; remove the
# CPU builds and reinstall the GPU ones so the GPU build is the one that imports.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip setuptools wheel \
    && if [ -n "$EXTRAS" ]; then /opt/venv/bin/pip install ".[${EXTRAS}]"; else /opt/venv/bin/pip install ".[tracing]"; fi \
    && case ",${EXTRAS}," in \
         *,gpu,*) /opt/venv/bin/pip uninstall -y onnxruntime faiss-cpu \
                  && /opt/venv/bin/pip install --force-reinstall --no-deps onnxruntime-gpu faiss-gpu-cu12 ;; \
       esac

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 hyperrec && useradd --system --uid 10001 --gid hyperrec --home-dir /srv --shell /usr/sbin/nologin hyperrec
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HYPERREC_HOST=0.0.0.0 \
    HYPERREC_PORT=50051 \
    HYPERREC_MODEL_REPO=/srv/model_repo \
    HYPERREC_LOG_FORMAT=json
WORKDIR /srv
RUN mkdir -p /srv/model_repo && chown hyperrec:hyperrec /srv/model_repo
USER 10001:10001
EXPOSE 50051
# `hyperrec health` asks 127.0.0.1 at $HYPERREC_HEALTH_PORT (set it when the main port speaks TLS), else $HYPERREC_PORT.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD ["hyperrec", "health"]
ENTRYPOINT ["hyperrec"]
CMD ["serve"]
