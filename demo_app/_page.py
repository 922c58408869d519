"""The demo's one HTML page. Every value from outside is escaped."""

from __future__ import annotations

import html
import json
from typing import Any

__all__ = ["render_page"]

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>demo_app {instance}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; }}
code, pre {{ background: #f4f4f4; padding: .2rem .4rem; border-radius: 4px; }}
button {{ font: inherit; margin-right: .5rem; }}
</style>
</head>
<body>
<h1>Served by instance <code id="instance">{instance}</code></h1>
<p>pid <code id="pid">{pid}</code>, session store <code id="store">{store}</code></p>
<h2>Your session</h2>
<pre id="session">{session}</pre>
<p>
<button onclick="post('/api/counter')">Increment counter</button>
<button onclick="post('/api/cart', {{item: 'item-' + Date.now() % 1000}})">Add to cart</button>
<button onclick="post('/api/logout')">Log out</button>
</p>
<script>
async function post(path, body) {{
  const response = await fetch(path, {{
    method: "POST",
    headers: {{"content-type": "application/json"}},
    body: JSON.stringify(body || {{}}),
  }});
  if (!response.ok) {{ alert(await response.text()); }}
  location.reload();
}}
</script>
</body>
</html>
"""


def render_page(instance: str, pid: int, store: str, session: dict[str, Any]) -> str:
    return _TEMPLATE.format(
        instance=html.escape(instance),
        pid=pid,
        store=html.escape(store),
        session=html.escape(json.dumps(session, indent=2, sort_keys=True)),
    )
