"""A FastAPI app with server-side sessions: a cart and a login, in Redis.

    SESSION_SECRET_KEY=$(python -c "import secrets; print(secrets.token_urlsafe(32))") \
    REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.fastapi_app:app

The middleware line is the one an app using Starlette's ``SessionMiddleware`` has: only
the import changed. With no store given, the store is the one ``SESSION_STORE_URL`` names
(``redis://...``, ``hybrid+redis://...``, ``memory://``), else ``REDIS_URL``'s, else this
process's memory, with a warning at start; it is closed when the app shuts down.

    curl -c jar -b jar -X POST 'localhost:8000/cart?item=book'    {"cart":["book"]}
    curl -c jar -b jar -X POST 'localhost:8000/login?user=alice'  {"user":"alice"}
    curl -c jar -b jar localhost:8000/cart                        {"cart":["book"]}
    curl -c jar -b jar -X POST localhost:8000/logout              {"user":null}

Logged in on several devices, one logs the others out (``bind_user`` at login):

    curl -c jar -b jar -X POST localhost:8000/logout-everywhere   {"logged_out":2}
"""

from __future__ import annotations

import os

from fastapi import FastAPI, HTTPException

from session_store import SessionMiddleware, bind_user, logout_everywhere
from session_store.fastapi import SessionDep

SECRET_KEY = os.environ.get("SESSION_SECRET_KEY", "")
if not SECRET_KEY:
    raise SystemExit(
        "examples/fastapi_app.py: set SESSION_SECRET_KEY (16 characters or more), made with: "
        'python -c "import secrets; print(secrets.token_urlsafe(32))"'
    )

app = FastAPI()
app.add_middleware(SessionMiddleware, secret_key=SECRET_KEY)


@app.get("/cart")
async def cart(session: SessionDep) -> dict[str, list[str]]:
    return {"cart": session.get("cart", [])}


@app.post("/cart")
async def add_to_cart(item: str, session: SessionDep) -> dict[str, list[str]]:
    # A change inside a value is saved too: no mark_modified() needed.
    session.setdefault("cart", []).append(item)
    return {"cart": session["cart"]}


@app.post("/login")
async def login(user: str, session: SessionDep) -> dict[str, str | None]:
    # A new session id at login, the cart kept: an id planted before is worth nothing.
    session.regenerate()
    session["user"] = user
    bind_user(session, user)  # under the new id, when this response saves the session
    return {"user": user}


@app.post("/logout")
async def logout(session: SessionDep) -> dict[str, str | None]:
    session.destroy()  # gone from the store, the cookie cleared
    return {"user": None}


@app.post("/logout-everywhere")
async def logout_everywhere_else(session: SessionDep) -> dict[str, int]:
    """Every other session of this user destroyed (tombstones: none comes back)."""
    user = session.get("user")
    if not isinstance(user, str):
        raise HTTPException(status_code=401, detail="log in first")
    return {"logged_out": len(await logout_everywhere(session, user))}
