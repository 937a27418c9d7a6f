# spectrawatch server image: API (`spectrawatch server`) and analysis worker (`spectrawatch worker`).
#
#   docker build -t spectrawatch:cpu .                          # CPU-only torch (small)
#   docker build -t spectrawatch:cuda --build-arg VARIANT=cuda .  # CUDA torch wheels
#
# Both variants use the slim Python base: PyTorch's CUDA wheels carry their CUDA runtime
# libraries, and the driver comes from the host through the NVIDIA container toolkit
# (`deploy.resources.reservations.devices` in docker-compose.yml). Runs as a non-root user;
# health checks live in docker-compose.yml (the API has one, workers serve no HTTP).
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu124
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN case "$VARIANT" in \
      cpu) index="$TORCH_INDEX_CPU" ;; \
      cuda) index="$TORCH_INDEX_CUDA" ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "$index" "torch${TORCH_VERSION:+==$TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client client
COPY server server
COPY migrations migrations
COPY dashboards dashboards
RUN pip install ".[server,scale]"

FROM python:${PYTHON_VERSION}-slim
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/spectrawatch \
      spectrawatch \
    && install -d -o spectrawatch -g spectrawatch /var/lib/spectrawatch/blobs
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SPECTRAWATCH_DATA_DIR=/var/lib/spectrawatch \
    SPECTRAWATCH_HOST=0.0.0.0
USER spectrawatch
WORKDIR /var/lib/spectrawatch
EXPOSE 8765
ENTRYPOINT ["spectrawatch"]
CMD ["server"]
