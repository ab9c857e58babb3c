"""Shop API 1.0.0: place and list orders."""
from __future__ import annotations

from typing import Any

from shop_store import HttpError, JsonHandler, parse_order, serve

VERSION = "1.0.0"


def healthz(h: JsonHandler) -> tuple[int, Any]:
    try:
        return 200, {"status": "ok", **h.store.check()}
    except Exception as exc:  # any failure of a store makes the API unhealthy
        return 500, {"status": "unhealthy", "error": f"{type(exc).__name__}: {str(exc).strip()}"}


def version(h: JsonHandler) -> tuple[int, Any]:
    s = h.store.settings
    return 200, {"version": VERSION, "currency": s.currency, "page_size": s.page_size}


def list_orders(h: JsonHandler) -> tuple[int, Any]:
    return 200, {"orders": h.store.list_orders(h.store.settings.page_size), "currency": h.store.settings.currency}


def place_order(h: JsonHandler) -> tuple[int, Any]:
    item, quantity = parse_order(h.read_body())
    return 201, h.store.add_order(item, quantity)


ROUTES = {
    ("GET", "/healthz"): healthz,
    ("GET", "/version"): version,
    ("GET", "/orders"): list_orders,
    ("POST", "/orders"): place_order,
}

if __name__ == "__main__":
    serve(VERSION, ROUTES)
