# syntax=docker/dockerfile:1
# The Switchyard operator image: Kopf + the operator package, nothing of the serving stack.
#
# Why not `pip install switchyard`: the package's dependencies include the router's (gRPC,
# transformers, tokenizers); the operator imports none of them. The wheel is installed with
# --no-deps and only what `switchyard operator` imports is added, pinned like pyproject.toml.
# Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/switchyard/operator:0.1.0 .
# Not built in CI (no Docker engine there); see docs/operations/images.md.

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY switchyard ./switchyard
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin switchyard
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl \
 && pip install --no-cache-dir \
      "kopf==1.45.2" \
      "kubernetes>=37" \
      "pydantic>=2.10" \
      "prometheus-client>=0.20" \
      "pyyaml>=6" \
 && rm -rf /wheels \
 && switchyard operator --help >/dev/null
USER 1000:1000
ENTRYPOINT ["switchyard", "operator"]
