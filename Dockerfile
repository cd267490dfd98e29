# One image for the operator and every service:
#   tradingstack operator --all-namespaces
#   tradingstack service NAME
# Stage 1 builds wheels (compilers allowed); stage 2 installs them into a clean slim image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN pip install --no-cache-dir --upgrade pip build
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY services ./services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tradingstack" \
      org.opencontainers.image.description="Operator and services of a real-time trading data platform" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels tradingstack \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 tradingstack \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin tradingstack
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 9090
ENTRYPOINT ["tradingstack"]
CMD ["operator", "--all-namespaces"]
