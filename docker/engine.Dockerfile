# syntax=docker/dockerfile:1
# The Switchyard engine image: router/gateway, engine workers, Ray head and KV-cache servers.
#
# Why on the vLLM image: it carries the CUDA, torch and vLLM build that vLLM's own CI tested
# together; Switchyard adds Python code on top and must not replace any of them. The tag is
# the vLLM version pyproject.toml pins for the `gpu` extra; Ray is pinned to the version the
# LLMService's `spec.ray.version` defaults to (head and workers must match exactly).
# Build from the repository root:
#   docker build -f docker/engine.Dockerfile -t ghcr.io/switchyard/engine:0.1.0 .
# Not built in CI (no Docker engine there); see docs/operations/images.md.

FROM vllm/vllm-openai:v0.32.0
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache
COPY pyproject.toml README.md /src/
COPY switchyard /src/switchyard
# Constrain the install to the base image's torch/vLLM stack so pip can only add packages.
RUN python3 -m pip freeze | grep -iE '^(torch|torchvision|torchaudio|vllm|triton|xformers|flashinfer[-_a-z]*|transformers|tokenizers)==' > /tmp/base-constraints.txt \
 && python3 -m pip install --no-cache-dir -c /tmp/base-constraints.txt /src "ray[default]==2.60.0" \
 && rm -rf /src /tmp/base-constraints.txt \
 && python3 -c "import vllm, ray, switchyard.workers, switchyard.router, switchyard.kvcache.server" \
 && (id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin switchyard)
# uid 1000 is the user the operator's pod templates run as (runAsUser), with a read-only root
# filesystem and an emptyDir on /tmp for Ray's session files and caches.
USER 1000:1000
ENTRYPOINT ["switchyard"]
CMD ["--help"]
