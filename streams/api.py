"""The read API and health endpoints, on the worker's web port beside ``/metrics``.

JSON over HTTP, read from the Redis cache, so any worker answers for any user. Routes (the
OpenAPI document in ``infra/openapi.yaml`` describes the same, and a test keeps them equal):

- ``GET /v1/profiles/{user_id}``: segment, cluster, lead score with explanation, next-best-offer
  with reason, consent, updated_at; 404 for an unknown user.
- ``GET /v1/leads/top?limit=N``: the N users with the highest lead score.
- ``GET /v1/segments``: sizes and definitions.
- ``GET /healthz``: the process is up. ``GET /readyz``: partitions assigned and Redis answers.
- ``GET /metrics``: Prometheus text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust
import orjson

from connectors.redis_cache import ProfileCache
from streams.metrics import CONTENT_TYPE_LATEST, Metrics

ROUTES = (
    "/v1/profiles/{user_id}",
    "/v1/leads/top",
    "/v1/segments",
    "/healthz",
    "/readyz",
    "/metrics",
)
MAX_LIMIT = 1000


def profile_document(user_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """The API's profile JSON from the Redis hash fields."""

    def number(name: str) -> float | None:
        value = fields.get(name, "")
        return float(value) if value else None

    def flag(name: str) -> bool | None:
        value = fields.get(name, "")
        return None if value == "" else value == "1"

    offer = None
    if fields.get("offer_id"):
        offer = {
            "offer_id": fields["offer_id"],
            "channel": fields.get("offer_channel") or None,
            "reason": fields.get("offer_reason") or None,
            "propensity": number("offer_propensity"),
            "policy": fields.get("offer_policy") or None,
        }
    lead = None
    if fields.get("lead_score"):
        lead = {
            "score": number("lead_score"),
            "explanation": orjson.loads(fields.get("lead_explanation") or "[]"),
            "model_version": int(fields.get("lead_model_version") or 0),
        }
    return {
        "user_id": user_id,
        "segment": fields.get("segment") or None,
        "segment_reason": fields.get("segment_reason") or None,
        "cluster": int(fields["cluster"]) if fields.get("cluster") else None,
        "lead": lead,
        "next_best_offer": offer,
        "consent": {"email": flag("consent_email"), "advertising": flag("consent_advertising")},
        "unsubscribed": flag("unsubscribed"),
        "orders": int(fields.get("orders") or 0),
        "revenue": number("revenue") or 0.0,
        "cart_value": number("cart_value") or 0.0,
        "updated_at": fields.get("updated_at") or None,
    }


def add_routes(
    app: faust.App,
    *,
    cache: ProfileCache,
    metrics: Metrics,
    segment_definitions: Callable[[], list[dict[str, Any]]],
) -> None:
    """Register the API's views on ``app``'s web server."""

    @app.page("/metrics")
    async def prometheus_metrics(view: Any, request: Any) -> Any:
        return view.bytes(metrics.exposition(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/healthz")
    async def healthz(view: Any, request: Any) -> Any:
        return view.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(view: Any, request: Any) -> Any:
        assigned = len(app.consumer.assignment()) if app.consumer else 0
        redis_ok = await cache.ping()
        ready = assigned > 0 and redis_ok and not app.rebalancing
        body = {"ready": ready, "partitions_assigned": assigned, "redis": redis_ok}
        return view.json(body, status=200 if ready else 503)

    @app.page("/v1/profiles/{user_id}")
    async def profile(view: Any, request: Any, user_id: str) -> Any:
        fields = await cache.read_profile(user_id)
        if not fields:
            return view.json({"error": "unknown user", "user_id": user_id}, status=404)
        return view.json(profile_document(user_id, fields))

    @app.page("/v1/leads/top")
    async def top_leads(view: Any, request: Any) -> Any:
        raw = request.query.get("limit", "10")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            error = f"limit must be an integer from 1 to {MAX_LIMIT}"
            return view.json({"error": error}, status=400)
        leads = await cache.top_leads(int(raw))
        return view.json({"leads": [{"user_id": u, "score": s} for u, s in leads]})

    @app.page("/v1/segments")
    async def segments(view: Any, request: Any) -> Any:
        sizes = await cache.segment_sizes()
        return view.json({"sizes": sizes, "definitions": segment_definitions()})
