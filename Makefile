# Developer entry points. The test world needs root, Docker and qemu binfmt: `scripts/bootstrap` once (as root, or it re-runs itself under sudo).
#   make world-up [SITE=dev] [HOSTS="repo:amd64:offline_repo node1:amd64:targets"]
#   make world-status / make world-down [SITE=dev]
# Inside a site: .venv/bin/python -m tests.world exec $(SITE) -- ansible all -m ansible.builtin.ping
PYTHON ?= .venv/bin/python
SITE ?= dev
HOSTS ?=
HOST_ARGS := $(foreach h,$(HOSTS),--host $(h))

.PHONY: world-up world-down world-status world-images world-prune test demo molecule

world-up:
	$(PYTHON) -m tests.world up $(SITE) $(HOST_ARGS)

world-down:
	$(PYTHON) -m tests.world down $(SITE)

world-status:
	$(PYTHON) -m tests.world status $(if $(filter command line,$(origin SITE)),$(SITE))

world-images:
	$(PYTHON) -m tests.world build

world-prune:
	$(PYTHON) -m tests.world prune

test:
	scripts/test

demo:
	scripts/demo

# Molecule on the world's images (molecule/base.yml + molecule/$(SCENARIO)/): image tags from
# `tests.world env`, community.docker + ansible.posix from `tests.world collections`, and this checkout as
# offline.delivery (the roles use its filters).
SCENARIO ?= world
molecule:
	set -e; eval "$$($(PYTHON) -m tests.world env | sed 's/^/export /')"; \
	mkdir -p .world/molecule/ansible_collections/offline; \
	ln -sfn "$(CURDIR)" .world/molecule/ansible_collections/offline/delivery; \
	export ANSIBLE_COLLECTIONS_PATH="$(CURDIR)/.world/molecule:$$($(PYTHON) -m tests.world collections)"; \
	export PATH="$(CURDIR)/.venv/bin:$$PATH"; \
	molecule -c molecule/base.yml test -s $(SCENARIO)
