"""Build the Grafana dashboard of `ibc` (deploy/monitoring/grafana-dashboard.json) from a short description.

Why a generator: a dashboard's JSON is thousands of lines of layout boilerplate around a few dozen PromQL
expressions. Keeping the expressions here, one per panel, makes them reviewable, and
tests/unit/test_deploy.py checks that every metric they name is one the code exports and that the JSON
file is this script's output. Run: `python deploy/tools/grafana_dashboard.py` (then
`bash deploy/tools/sync-chart.sh` to copy it into the Helm chart).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "monitoring" / "grafana-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model=~"$model"'
NS = 'namespace=~"$namespace"'


@dataclass(frozen=True)
class Panel:
    """One panel: a title, what it tells the operator, PromQL targets (expr, legend), unit and kind."""

    title: str
    description: str
    targets: tuple[tuple[str, str], ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | bargauge
    width: int = 8
    thresholds: tuple[tuple[float | None, str], ...] = ((None, "green"),)
    options: dict[str, Any] = field(default_factory=dict)


ROWS: list[tuple[str, list[Panel]]] = [
    ("Overview", [
        Panel("Requests / s", "Requests the proxy answered, all models.",
              ((f"sum(rate(ibc_proxy_requests_total{{{MODEL}}}[$__rate_interval]))", "req/s"),),
              unit="reqps", kind="stat", width=4),
        Panel("Refused for memory", "Share of requests answered 429 because the model does not fit now. "
              "Sustained values mean the pool is too small for the traffic mix (or cooldowns too long).",
              ((f'sum(rate(ibc_proxy_requests_total{{{MODEL},status="429"}}[$__rate_interval])) / '
                f"clamp_min(sum(rate(ibc_proxy_requests_total{{{MODEL}}}[$__rate_interval])), 1e-9)", "429 share"),),
              unit="percentunit", kind="stat", width=4,
              thresholds=((None, "green"), (0.01, "orange"), (0.1, "red"))),
        Panel("Held in cold starts", "Requests waiting for a model to start (bounded per model).",
              ((f"sum(ibc_proxy_queue_depth{{{MODEL}}})", "held"),), kind="stat", width=4),
        Panel("Declared memory", "Memory all InferenceModels declare per replica, summed (what the budget reserves "
              "per running replica). Every controller replica exports the gauges: max by model de-duplicates.",
              ((f"sum(max by (namespace, model) (inference_model_memory_declared_bytes{{{MODEL},{NS}}}))",
                "declared"),),
              unit="bytes", kind="stat", width=4),
        Panel("Scaled to zero (24h)", "Models the controller stopped after their cooldownPeriod without requests.",
              (("sum(increase(inference_controller_idle_scale_to_zero_total[24h]))", "scale-downs"),),
              kind="stat", width=4),
        Panel("Admission denials / s", "Scale-ups the webhook refused (create, update or /scale).",
              (('sum(rate(ibc_webhook_reviews_total{result="denied"}[$__rate_interval]))', "denied/s"),),
              unit="reqps", kind="stat", width=4,
              thresholds=((None, "green"), (0.01, "orange"))),
    ]),
    ("Proxy", [
        Panel("Requests by status", "Answers per HTTP status: 429 = the model's memory does not fit now; "
              "503 = could not start it (queue full, scaler unavailable); 504 = its cold start timed out.",
              ((f"sum by (status) (rate(ibc_proxy_requests_total{{{MODEL}}}[$__rate_interval]))", "{{status}}"),),
              unit="reqps"),
        Panel("Refusals by reason", "Requests refused before reaching a backend: insufficient_memory (proxy's own "
              "decision), scale_denied (the webhook refused the scale-up), queue_full, scaler_unavailable, "
              "cold_start_timeout.",
              ((f"sum by (reason) (rate(ibc_proxy_rejections_total{{{MODEL}}}[$__rate_interval]))", "{{reason}}"),),
              unit="reqps"),
        Panel("Cold start time", "From the first held request of a cold model to its first ready backend.",
              ((f"histogram_quantile(0.5, sum by (le) (rate(ibc_proxy_cold_start_seconds_bucket{{{MODEL}}}"
                "[$__rate_interval])))", "p50"),
               (f"histogram_quantile(0.95, sum by (le) (rate(ibc_proxy_cold_start_seconds_bucket{{{MODEL}}}"
                "[$__rate_interval])))", "p95")),
              unit="s"),
        Panel("Held requests by model", "Requests waiting while their model starts.",
              ((f"sum by (model) (ibc_proxy_queue_depth{{{MODEL}}})", "{{model}}"),)),
        Panel("Backend time to headers", "From forwarding a request to the backend's response headers.",
              ((f"histogram_quantile(0.5, sum by (le) (rate(ibc_proxy_upstream_latency_seconds_bucket{{{MODEL}}}"
                "[$__rate_interval])))", "p50"),
               (f"histogram_quantile(0.99, sum by (le) (rate(ibc_proxy_upstream_latency_seconds_bucket{{{MODEL}}}"
                "[$__rate_interval])))", "p99")),
              unit="s"),
        Panel("Backend errors", "Backend calls that failed: unreachable, timeout, broken stream.",
              ((f"sum by (model, kind) (rate(ibc_proxy_upstream_errors_total{{{MODEL}}}[$__rate_interval]))",
                "{{model}} {{kind}}"),),
              unit="reqps"),
    ]),
    ("Memory budget", [
        Panel("Declared vs observed peak", "Declared memory (what is budgeted) against the peak one replica was "
              "seen using. Observation advises only: the budget never shrinks by itself.",
              ((f"max by (namespace, model) (inference_model_memory_declared_bytes{{{MODEL},{NS}}})",
                "{{namespace}}/{{model}} declared"),
               (f"max by (namespace, model) (inference_model_memory_observed_peak_bytes{{{MODEL},{NS}}})",
                "{{namespace}}/{{model}} observed peak")),
              unit="bytes", width=12),
        Panel("Utilization (observed peak / declared)", "Below ~0.8 a model declares more than it uses: lowering "
              "spec.memory would let more models fit (see the InferenceModel's status.recommendation).",
              ((f"max by (namespace, model) (inference_model_memory_utilization_ratio{{{MODEL},{NS}}})",
                "{{namespace}}/{{model}}"),),
              unit="percentunit", kind="bargauge", width=12,
              thresholds=((None, "orange"), (0.8, "green"), (1.0, "red"))),
    ]),
    ("Admission webhook", [
        Panel("Reviews by result", "AdmissionReviews answered, by result and reason.",
              (("sum by (result, reason) (rate(ibc_webhook_reviews_total[$__rate_interval]))",
                "{{result}} {{reason}}"),),
              unit="reqps"),
        Panel("Review latency", "Time to answer a review. It must stay well under the webhook's timeoutSeconds.",
              (("histogram_quantile(0.99, sum by (le, resource) (rate(ibc_webhook_review_duration_seconds_bucket"
                "[$__rate_interval])))", "p99 {{resource}}"),),
              unit="s"),
        Panel("Ledger conflicts and bad requests", "Optimistic-concurrency retries on the admission ledger "
              "(concurrent scale-ups) and bodies that were not AdmissionReviews.",
              (("sum(rate(ibc_webhook_ledger_conflicts_total[$__rate_interval]))", "ledger conflicts"),
               ("sum(rate(ibc_webhook_bad_requests_total[$__rate_interval]))", "bad requests")),
              unit="reqps"),
    ]),
    ("Scheduler extender", [
        Panel("Decisions", "Answers per pod by verb and result (fits, reserved, unschedulable, ...).",
              (("sum by (verb, result) (rate(ibc_extender_decisions_total[$__rate_interval]))",
                "{{verb}} {{result}}"),),
              unit="reqps"),
        Panel("Nodes refused, by reason", "Per-node filter verdicts that were not 'passed': why model pods cannot go "
              "to a node (insufficient memory, not budgeted, selector mismatch).",
              (('sum by (reason) (rate(ibc_extender_node_verdicts_total{result!="passed"}[$__rate_interval]))',
                "{{reason}}"),),
              unit="ops"),
        Panel("Filter latency and reservations", "Time to answer a filter call, and memory reservations held for "
              "pods not yet seen bound.",
              (("histogram_quantile(0.99, sum by (le) (rate(ibc_extender_filter_duration_seconds_bucket"
                "[$__rate_interval])))", "filter p99 (s)"),
               ("sum(ibc_extender_reservations)", "reservations held")),
              unit="short"),
    ]),
    ("Controller", [
        Panel("Reconciles by result", "Reconciles of InferenceModels by result.",
              (("sum by (result) (rate(inference_controller_reconcile_total[$__rate_interval]))", "{{result}}"),),
              unit="ops"),
        Panel("Reconcile time and queue", "p95 time of one reconcile, and model keys waiting.",
              (("histogram_quantile(0.95, sum by (le) (rate(inference_controller_reconcile_duration_seconds_bucket"
                "[$__rate_interval])))", "p95 (s)"),
               ("max(inference_controller_queue_depth)", "queue depth")),
              unit="short"),
        Panel("Writes, leadership, observation errors", "API writes by kind; 1 replica should be leader; failed "
              "observed-memory queries (Prometheus or metrics API unreachable).",
              (("sum by (kind) (rate(inference_controller_writes_total[$__rate_interval]))", "writes {{kind}}"),
               ("sum(inference_controller_leader)", "leaders"),
               ("sum by (source) (rate(inference_controller_observation_errors_total[$__rate_interval]))",
                "observation errors {{source}}")),
              unit="short"),
    ]),
]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    steps = [{"color": color, "value": value} for value, color in panel.thresholds]
    body: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"h": 4 if panel.kind == "stat" else 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {"unit": panel.unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "targets": [
            {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }
    if panel.kind == "timeseries":
        body["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
    elif panel.kind == "stat":
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value", "graphMode": "area"}
    else:
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "orientation": "horizontal",
                           "displayMode": "gradient"}
        body["fieldConfig"]["defaults"]["min"] = 0
        body["fieldConfig"]["defaults"]["max"] = 1.2
    body["options"].update(panel.options)
    return body


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"{name}-query"}, "definition": query,
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def build() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict (Grafana 10+ schema)."""
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row_title, row_panels in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y = 0, y + row_height
                row_height = 0
            body = _panel_json(panel, panel_id, x, y)
            panels.append(body)
            panel_id += 1
            x += panel.width
            row_height = max(row_height, body["gridPos"]["h"])
        y += row_height
    return {
        "uid": "ibc-overview",
        "title": "Inference Budget Controller",
        "description": "Memory-budget admission, scheduling and scale-to-zero of LLM inference (ibc).",
        "tags": ["ibc", "inference", "llm"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            _variable("namespace", "Namespace", "label_values(inference_model_memory_declared_bytes, namespace)"),
            _variable("model", "Model", "label_values(ibc_proxy_requests_total, model)"),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    """The file's exact text (stable key order, trailing newline)."""
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    """Write the dashboard (or, with --check, exit 1 when the file is stale)."""
    text = render()
    if argv[1:] == ["--check"]:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
