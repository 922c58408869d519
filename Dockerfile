# One image for every service of the stack: the demo app (`python -m demo_app`) and the
# balancer (`python -m balancer`); compose.yaml and deploy/k8s/ pick the command.
# No secret is baked in: cookie keys and the admin token come from the environment at run time.
#
# Two stages: the first compiles the balancer's data path with mypyc (scripts/build-fast,
# ~0.6x the CPU a request of plain Python), which needs a C compiler that the image itself
# does not carry; the second installs the project with those extension modules.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY redis_plumbing ./redis_plumbing
COPY service_registry ./service_registry
COPY session_store ./session_store
COPY balancer ./balancer
COPY demo_app ./demo_app
COPY scripts/build-fast ./scripts/build-fast
RUN pip install --no-cache-dir -c constraints.txt . mypy "setuptools>=69" \
    && PYTHON=python scripts/build-fast

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Metadata first: the dependency layer is rebuilt only when pyproject.toml or the pinned
# versions (constraints.txt, the set the tests passed with) change.
COPY pyproject.toml README.md constraints.txt ./
COPY redis_plumbing ./redis_plumbing
COPY service_registry ./service_registry
COPY session_store ./session_store
COPY --from=build /app/balancer ./balancer
COPY demo_app ./demo_app

# A plain (non-editable) install of the project and its runtime dependencies only: no dev
# tools, no Redis binary (compose and Kubernetes run the official redis image).
RUN pip install -c constraints.txt . \
    && (cd / && python -c "import balancer._build as b, balancer.datapath._proxy as p; assert b.compiled(p)") \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin app

# A numeric user, so Kubernetes' runAsNonRoot can verify it without resolving names.
USER 10001

EXPOSE 8000 8080 8081

# The default: one demo app instance with sessions in memory; compose.yaml overrides it.
CMD ["python", "-m", "demo_app", "--host", "0.0.0.0", "--port", "8000", "--instance-id", "app"]
