# syntax=docker/dockerfile:1
# Build stage: wheels for the project and its dependencies (binary wheels; no compiler needed).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Final stage: no build tools, a non-root user, migrations and policies beside the package.
FROM python:3.11-slim
# The package is installed in site-packages; its migrations and policies are in /app.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TODO_API_ROOT=/app
RUN useradd --system --uid 10001 --home-dir /app todo
WORKDIR /app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY alembic.ini ./
COPY db ./db
USER todo
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["todo-api", "serve", "--host", "0.0.0.0", "--port", "8000"]
