"""AUTOMATIC1111-compatible HTTP API for sd15: `python -m server` (also `sd15-server`).

server/app.py: routes, lifespan, GPU queue, progress; server/a1111.py: request/response shapes and
validation; server/models.py: model folders, titles, hashes, switching; server/download.py: first-run
download of the default checkpoint.
"""
