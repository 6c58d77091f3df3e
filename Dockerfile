# The Persona engine image: `persona worker` by default; `persona simulate` etc. as commands.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY connectors ./connectors
COPY streams ./streams
RUN pip install --no-cache-dir '.[rocksdb]'
ENV PERSONA_WEB_HOST=0.0.0.0 \
    PERSONA_DATA_DIR=/var/lib/persona
EXPOSE 6066
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
  CMD python -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PERSONA_WEB_PORT','6066'), timeout=2)"
ENTRYPOINT ["persona"]
CMD ["worker"]
