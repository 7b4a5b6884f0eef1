# The few verbs a person needs. Everything installs into the repo (.venv, .stack) unless told otherwise.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= $(CURDIR)/.venv
STACK_PREFIX ?= $(CURDIR)/.stack
PROTO_DIR := proto
PROTO_FILES := $(sort $(wildcard $(PROTO_DIR)/kybernate/api/*.proto))
export STACK_PREFIX

.PHONY: all venv proto proto-check stack image lint test unit demo standby-demo bench clean-stack

all: venv

# A venv with the package installed in editable mode plus the build/test tools.
venv: $(VENV)/.installed $(VENV)/.native
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# The shim binary: the native client (shim/native/shim_client.c) answers a pod's later `start`s and most
# `delete`s itself and hands the rest to kybernate-shimd, else to the Python launcher beside it (`<binary>.py`,
# shim/client.py run without site-packages). Without a C compiler the Python launcher is the binary itself.
# Linked statically where the C library allows it (libc.a, Debian's libc6-dev): containerd execs it for every
# container and every `delete`, and a static binary skips the dynamic loader (~0.3 ms an exec here,
# docs/benchmarks.md); else dynamically.
CC ?= cc
NATIVE_CFLAGS := -O2 -Wall -Wextra -Werror
SHIM_BIN := $(VENV)/bin/containerd-shim-kybernate-v1
# The pass lane (shim/native/passlane.c, loaded by shim/passlane.py from the venv's lib/): the pod daemon's
# pass-through below Python. Without it every call goes through Python.
PASSLANE := $(VENV)/lib/kybernate-passlane.so
$(VENV)/.native: $(VENV)/.installed shim/native/shim_client.c shim/native/passlane.c shim/client.py Makefile
	$(VENV)/bin/python -m kybernate.shim.client --write-launcher $(SHIM_BIN).py
	if command -v $(CC) >/dev/null; then \
		{ $(CC) $(NATIVE_CFLAGS) -static -o $(SHIM_BIN).tmp shim/native/shim_client.c 2>/dev/null \
			|| $(CC) $(NATIVE_CFLAGS) -o $(SHIM_BIN).tmp shim/native/shim_client.c; } \
		&& mv -f $(SHIM_BIN).tmp $(SHIM_BIN) \
		&& $(CC) $(NATIVE_CFLAGS) -shared -fPIC -pthread -o $(PASSLANE).tmp shim/native/passlane.c \
		&& mv -f $(PASSLANE).tmp $(PASSLANE); \
	else \
		echo "no C compiler ($(CC)): the shim binary stays the Python launcher, no pass lane"; \
		cp -f $(SHIM_BIN).py $(SHIM_BIN); \
	fi
	touch $@

# Regenerate the Python code for every .proto under proto/ (committed; `make proto-check` verifies it).
proto: venv
	rm -f $(PROTO_DIR)/kybernate/api/*_pb2*.py $(PROTO_DIR)/kybernate/api/*_pb2*.pyi
	$(VENV)/bin/python -m grpc_tools.protoc -I$(PROTO_DIR) \
		--python_out=$(PROTO_DIR) --pyi_out=$(PROTO_DIR) --grpc_python_out=$(PROTO_DIR) \
		$(PROTO_FILES)

proto-check: venv
	$(VENV)/bin/python tests/tools/check_proto.py

# The private test stack: containerd 1.6.20 and 2.1.x, runc, CNI plugins, CRIU 4.x, checkpointctl, rclone.
stack:
	PYTHON=$(PYTHON) packaging/stack/provision.sh "$(STACK_PREFIX)"

# The node installer image (OCI tar for `ctr images import`), built without a container daemon:
# packaging/image/build.py (the Dockerfile runs the same script). Downloads are cached in /var/tmp/kyb-image-cache; unchanged inputs: no rebuild.
image: venv
	$(VENV)/bin/pip install -q --disable-pip-version-check -r packaging/image/build-tools.txt
	$(VENV)/bin/python packaging/image/build.py

# Type checks (mypy --strict), ruff, and the import directions of docs/architecture.md. mypy does not read
# setuptools' package-dir, so .lint/ holds a tree of links that gives it the kybernate.* names.
RUFFED := shim hooks packaging/installer tests/tools
lint: venv
	@mkdir -p .lint/kybernate
	@ln -sfn ../../shim .lint/kybernate/shim; ln -sfn ../../hooks .lint/kybernate/hooks; \
		ln -sfn ../../proto/kybernate/api .lint/kybernate/api
	MYPYPATH=.lint $(VENV)/bin/mypy -p kybernate.shim -p kybernate.hooks
	$(VENV)/bin/mypy packaging/installer/install.py tests/tools
	$(VENV)/bin/ruff check $(RUFFED)
	$(VENV)/bin/python tests/tools/import_rules.py

unit: venv proto-check
	$(VENV)/bin/python -m pytest tests/unit -q

test: venv lint stack proto-check image
	$(VENV)/bin/python -m pytest -q

demo: venv stack
	$(VENV)/bin/python tests/demo.py

# Three HTTP "model servers" share a fake GPU that holds two of them: park, wake on connect, the arbiter
# (docs/standby.md). STANDBY_DEMO_S=20 for a short run.
STANDBY_DEMO_S ?= 60
standby-demo: venv stack
	$(VENV)/bin/python tests/bench/standby_demo.py --duration $(STANDBY_DEMO_S)

bench: venv stack
	$(VENV)/bin/python tests/bench/bench_shim.py
	$(VENV)/bin/python tests/bench/bench_cri.py

clean-stack:
	rm -rf "$(STACK_PREFIX)"
