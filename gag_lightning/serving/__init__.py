"""Serving: an OpenAI-compatible, routed GAG server on LitServe (``serve.py``)."""
