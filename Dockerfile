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
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home carddesk

USER carddesk
# No channels file and no secrets are baked in: production (the default) refuses to start
# until CARDDESK_CHANNELS_FILE and the keys of `cardctl keys generate` are given (SECURITY.md).
ENV CARDDESK_ENV=production
# No channels file is shipped: docker-compose.yml mounts one (CARDDESK_CHANNELS_FILE).
ENV CARDDESK_CHANNELS_FILE=/run/secrets/channels
CMD ["python", "-m", "cardctl.main", "--help"]
