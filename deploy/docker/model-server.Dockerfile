# syntax=docker/dockerfile:1
# glmserve model server on NVIDIA GPUs: CUDA runtime base, torch's CUDA wheel, non-root.
# Weights are never baked in: mount a checkpoint directory at /models (docs/deploy.md).
# Build from the repository root:
#   docker build -f deploy/docker/model-server.Dockerfile -t glmserve/model-server:0.1.0 .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
# Ubuntu's security updates replace exact package versions; the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/glmserve
ENV PATH=/opt/glmserve/bin:$PATH
RUN pip install --no-cache-dir pip==25.3 \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY glmserve ./glmserve
COPY model_server ./model_server
COPY http_bridge ./http_bridge
# The project's own pins (pyproject.toml); torch above stays the CUDA build.
RUN pip install --no-cache-dir "./[server]"

FROM ${CUDA_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /home/glmserve glmserve
COPY --from=build /opt/glmserve /opt/glmserve
ENV PATH=/opt/glmserve/bin:$PATH \
    HF_HOME=/tmp/hf \
    GLMSERVE_MODEL=/models \
    GLMSERVE_HOST=0.0.0.0 \
    GLMSERVE_PORT=50051 \
    GLMSERVE_HEALTH_PORT=50052 \
    GLMSERVE_METRICS_PORT=9400 \
    GLMSERVE_DEVICE=cuda \
    GLMSERVE_LOG_FORMAT=json
USER 10001
WORKDIR /home/glmserve
EXPOSE 50051 50052 9400
# Loading a 6B checkpoint takes a minute or more: SERVING only then.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('127.0.0.1:50052'); sys.exit(g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=4).status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["model-server"]
