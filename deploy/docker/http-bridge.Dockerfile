# syntax=docker/dockerfile:1
# glmserve HTTP bridge: the OpenAI API in front of the model servers. No torch, no
# transformers (the bridge extra). Build from the repository root:
#   docker build -f deploy/docker/http-bridge.Dockerfile -t glmserve/http-bridge:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN python -m venv /opt/glmserve
ENV PATH=/opt/glmserve/bin:$PATH
RUN pip install --no-cache-dir pip==25.3
WORKDIR /src
COPY pyproject.toml README.md ./
COPY glmserve ./glmserve
COPY model_server ./model_server
COPY http_bridge ./http_bridge
RUN pip install --no-cache-dir "./[bridge]"

FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --create-home --home-dir /home/glmserve glmserve
COPY --from=build /opt/glmserve /opt/glmserve
ENV PATH=/opt/glmserve/bin:$PATH \
    GLMSERVE_BRIDGE_HOST=0.0.0.0 \
    GLMSERVE_BRIDGE_PORT=8000 \
    GLMSERVE_LOG_FORMAT=json
USER 10001
WORKDIR /home/glmserve
EXPOSE 8000
# /health answers 200 while some model server is SERVING (503 otherwise).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["http-bridge"]
