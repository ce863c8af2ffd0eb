# One image for every Card Desk process; docker-compose.yml picks the module to run.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml ./
COPY shared ./shared
COPY services ./services
COPY cardctl ./cardctl
COPY config ./config
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home carddesk

USER carddesk
ENV CARDDESK_CHANNELS_FILE=/app/config/channels.dev.json
CMD ["python", "-m", "cardctl.main", "--help"]
