"""The session as a FastAPI dependency.

    from session_store.fastapi import SessionDep

    @app.post("/cart")
    async def add(item: str, session: SessionDep) -> list[str]:
        session.setdefault("cart", []).append(item)  # saved at the end of the request
        return session["cart"]

``SessionDep`` is ``request.session``, loaded (when the middleware's ``autoload`` did
not load it, the dependency does), for HTTP and WebSocket endpoints alike. It needs
`session_store.SessionMiddleware` on the app, and FastAPI (``pip install
sticky-sessions[fastapi]``); nothing else in `session_store` imports FastAPI.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from ._middleware import load_session
from ._session import Session

__all__ = ["SessionDep"]

SessionDep = Annotated[Session, Depends(load_session)]
