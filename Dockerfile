# One image for every `ibc` command (proxy, webhook, extender, controller, certs, local, mock-backend).
# The Deployments choose the command with `args`, e.g. `args: ["proxy", "--bind", "0.0.0.0:8080"]`.
#
# Two stages: the first builds a virtualenv with the package and its dependencies, the second copies
# only that virtualenv onto a clean base, so no build tools, pip cache or sources ship in the image.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/ibc
WORKDIR /src
# Metadata first, then the packages listed in pyproject's [tool.setuptools.packages.find].
COPY pyproject.toml README.md ./
COPY budget/ budget/
COPY kubeview/ kubeview/
COPY certs/ certs/
COPY serving/ serving/
COPY extender/ extender/
COPY webhook/ webhook/
COPY proxy/ proxy/
COPY controller/ controller/
COPY mockbackend/ mockbackend/
COPY local/ local/
COPY ibc/ ibc/
RUN /opt/ibc/bin/pip install . \
    && /opt/ibc/bin/python -m compileall -q /opt/ibc/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="inference-budget-controller" \
      org.opencontainers.image.description="Memory-budget admission, scheduling and scale-to-zero for LLM inference" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, so `runAsNonRoot: true` can be verified by the kubelet without a passwd lookup.
RUN groupadd --system --gid 65532 ibc \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ibc
COPY --from=build /opt/ibc /opt/ibc
# Bytecode was compiled at build time: the root filesystem is read-only at run time. Writable scratch
# (Prometheus multiprocess files, gunicorn's heartbeat) goes to /tmp, an emptyDir in the manifests.
ENV PATH=/opt/ibc/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
USER 65532:65532
WORKDIR /
ENTRYPOINT ["ibc"]
CMD ["--help"]
