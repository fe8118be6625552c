"""``sdinfer serve``: an HTTP server in front of one loaded model.

``app.create_app`` builds the FastAPI app (the OpenAI-shaped ``POST /v1/images/generations``,
jobs with per-step progress over server-sent events, the image store, ``/healthz``, ``/metrics``
and the web page in ``page/``); ``batching.Batcher`` runs every generation on one worker thread,
joining compatible requests that arrive within a short window into one pipeline call;
``store.ImageStore`` keeps every image and its parameters (SQLite in WAL mode and PNG files).
Needs the ``serve`` extra (``pip install -e ".[serve]"``)."""
