"""One FastAPI router per concern; `serve/app.py:create_app` includes them all."""
