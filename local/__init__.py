"""Local mode: the proxy's request path with the local scaler (`ibc local`).

- `local.config`: the YAML config (nodes, models, the command that starts a replica);
- `local.runtime`: one process per replica (start, health, memory, stop);
- `local.scaler`: the Scaler that decides with `budget.decide_scale` and starts processes, plus the
  routes local mode adds to the proxy's app.

Floor 3: above the services; uses only `proxy`'s public API (`create_app`, `proxy_of(app).require_key`,
`ScaleDenied`/`ScalerUnavailable`).
"""
