"""The web side of `jetfleet serve`: one ASGI application (Starlette under uvicorn) that
hosts bundles, `/metrics`, the console's JSON API and its pages (docs/console.md)."""
