"""Issue #38: Redis lost behind a silent network.  A partition drops packets and sends no reset, so a client that
waits for a reply without a deadline waits until TCP gives up, about 15 minutes.  A chat meeting such a Redis
gets the outage's 503 within a bound instead.

The "server" here accepts connections and never answers, as a peer behind a partition looks to a client whose
connection was open before the cut (a new connection would not even be accepted: the connect timeout covers
that).  The API runs in this process (Flask's test client): no worker is needed to show the wait.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from werkzeug.test import TestResponse

from api import create_app
from corral.redis_connection import SOCKET_TIMEOUT
from corral.settings import Settings
from tests.helpers import MODEL

pytestmark = pytest.mark.slow


@pytest.fixture()
def silent_redis() -> Iterator[str]:
    """A loopback port that accepts connections and reads what comes, but never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        done.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def test_a_chat_meeting_a_silent_redis_gets_a_503_within_the_read_timeout(settings: Settings, silent_redis: str) -> None:
    client = create_app(settings.model_copy(update={"redis_url": silent_redis})).test_client()
    replies: list[TestResponse] = []
    started = time.monotonic()
    chat = threading.Thread(daemon=True, target=lambda: replies.append(client.post("/api/chat", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False})))
    chat.start()
    chat.join(SOCKET_TIMEOUT + 5)  # without a read timeout the request would wait about 15 minutes
    took = time.monotonic() - started
    assert replies, f"no answer after {took:.0f} s"
    r = replies[0]
    assert r.status_code == 503, r.get_data(as_text=True)
    assert r.headers["Retry-After"] and "Redis" in r.get_json()["error"]
    print(f"silent Redis: 503 after {took:.1f} s")
