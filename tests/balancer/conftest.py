from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream for `configure_logging`; the "balancer" logger set back as it was after."""
    yield io.StringIO()
    logger = logging.getLogger("balancer")
    for handler in [h for h in logger.handlers if h.get_name() == "balancer"]:
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
