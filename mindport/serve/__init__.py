"""An OpenAI-compatible HTTP server over :class:`mindport.infer.engine.Engine` (``mindport serve``).

:mod:`protocol` holds the request models and OpenAI's error JSON, :mod:`text` turns token events into
text (incremental detokenization and stop strings), :mod:`metrics` the Prometheus metrics, :mod:`app`
the FastAPI routes and ``static/index.html`` the browser chat page served at ``/``.
"""
