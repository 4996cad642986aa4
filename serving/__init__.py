"""What every `ibc` server needs, in one place (floor 1: services import it, it imports no service).

- `serving.bind`: the one `HOST:PORT` rule (stdlib only; the mock backend uses it too);
- `serving.metrics`: the `/metrics` exposition, single-process or merged across gunicorn workers;
- `serving.http`: the Flask side: JSON error handlers, `/livez` `/healthz` `/readyz`, the `/metrics` route;
- `serving.runner`: the one server runner: gunicorn gthread workers with reloading TLS (`serve`), and
  the same app in a thread (`serve_in_thread`) for tests, tools and the controller's endpoints.

This file imports nothing, so `import serving.bind` stays light.
"""
