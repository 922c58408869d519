"""The demo app the balancer serves: sessions, a counter, a cart, and CPU work."""

from __future__ import annotations

from ._app import AppSettings, create_app

__all__ = ["AppSettings", "create_app"]
