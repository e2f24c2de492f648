"""A local server speaking the AUTOMATIC1111 web UI's HTTP API (``scripts/serve.py``), with a browser page."""
