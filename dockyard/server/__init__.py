"""The OpenAI-compatible HTTP server: ``dockyard serve``.

``protocol`` holds the wire models, ``serving`` turns requests into engine requests and outputs
into responses, ``app`` builds the FastAPI app and runs it under uvicorn, ``metrics`` renders
``/metrics``, ``cli`` adds the ``serve`` subcommand.
"""
