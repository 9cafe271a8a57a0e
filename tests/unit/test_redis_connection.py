"""REDIS_URL's forms (corral/redis_connection.py): a ``redis+sentinel://`` URL parsed strictly, and what each
client is built from it (redis-py's Sentinel pool, kombu's sentinel transport, the limits storage's pool).
Nothing here connects: the clients connect on first use."""

from __future__ import annotations

import pytest
from celery import _state as celery_state
from kombu import Connection
from pydantic import ValidationError
from redis.sentinel import SentinelConnectionPool

from corral.redis_connection import (
    SENTINEL_PORT,
    RedisUrlError,
    SentinelUrl,
    celery_broker,
    check_redis_url,
    parse_sentinel_url,
    redis_client,
)
from corral.settings import Settings


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database() -> None:
    assert parse_sentinel_url("redis+sentinel://s1:26380,s2,10.0.0.3:5000/mymaster/3") == SentinelUrl(
        sentinels=(("s1", 26380), ("s2", SENTINEL_PORT), ("10.0.0.3", 5000)), master_name="mymaster", db=3)
    assert parse_sentinel_url("redis+sentinel://s1/mymaster") == SentinelUrl((("s1", 26379),), "mymaster", 0)
    assert parse_sentinel_url("redis+sentinel://s1/mymaster/").db == 0  # one trailing slash is no database
    assert parse_sentinel_url("REDIS+SENTINEL://[::1]:26379,[fd00::2]/m.a-b_c").sentinels == (  # type: ignore[union-attr]
        ("::1", 26379), ("fd00::2", 26379))


def test_credentials_are_the_primarys_and_the_sentinels_own_come_as_parameters() -> None:
    url = parse_sentinel_url("redis+sentinel://:p%40ss%3Aw@s1/m/1?sentinel_password=sp")
    assert url is not None and (url.username, url.password) == (None, "p@ss:w")
    assert url.sentinel_kwargs()["password"] == "sp" and "username" not in url.sentinel_kwargs()
    url = parse_sentinel_url("redis+sentinel://app:secret@s1/m?sentinel_username=watch&sentinel_password=sp")
    assert url is not None and (url.username, url.password, url.sentinel_username) == ("app", "secret", "watch")
    # without sentinel_password the Sentinels are asked with no password (the primary's would be refused there)
    assert "password" not in parse_sentinel_url("redis+sentinel://:x@s1/m").sentinel_kwargs()  # type: ignore[union-attr]


@pytest.mark.parametrize("url, why", [
    ("redis+sentinel://s1", "no master name"),
    ("redis+sentinel://s1/", "no master name"),
    ("redis+sentinel:///m", "no Sentinel host"),
    ("redis+sentinel://s1:0/m", "out of range"),
    ("redis+sentinel://s1:65536/m", "out of range"),
    ("redis+sentinel://s1:/m", "is not host[:port]"),
    ("redis+sentinel://s1:x/m", "is not host[:port]"),
    ("redis+sentinel://s1,,s2/m", "is not host[:port]"),
    ("redis+sentinel://s1/m/x", "is not a number"),
    ("redis+sentinel://s1/m/-1", "is not a number"),
    ("redis+sentinel://s1/m/1/2", "the path is"),
    ("redis+sentinel://s1/m%2Fx", "may hold only"),
    ("redis+sentinel://s1/m?db=2", "unknown parameter 'db'"),
    ("redis+sentinel://s1/m?sentinel_password=a&sentinel_password=b", "given twice"),
    ("redis+sentinel://s1/m?sentinel_password", "query"),
    ("redis+sentinel://secret@s1/m", "':password@'"),
    ("redis+sentinel://s1/m#frag", "fragment"),
])
def test_a_bad_sentinel_url_says_what_is_wrong_and_the_form(url: str, why: str) -> None:
    with pytest.raises(RedisUrlError, match="bad Sentinel REDIS_URL") as caught:
        parse_sentinel_url(url)
    assert why in str(caught.value) and "redis+sentinel://[[username]:password@]host[:port]" in str(caught.value)


def test_other_urls_are_redis_pys_and_an_unknown_scheme_is_refused() -> None:
    for url in ("redis://h:6379/0", "rediss://:pw@h/1", "unix:///run/redis.sock?db=2"):
        assert parse_sentinel_url(url) is None and check_redis_url(url) == url
    for url in ("sentinel://h:26379", "http://h", "h:6379"):
        with pytest.raises(RedisUrlError, match="must start with redis://"):
            check_redis_url(url)


def test_the_setting_refuses_a_bad_url_at_start_up() -> None:
    with pytest.raises(ValidationError, match="no master name"):
        Settings(redis_url="redis+sentinel://s1:26379")
    assert Settings(redis_url="redis+sentinel://s1/m/2").redis == "redis+sentinel://s1/m/2"
    assert Settings(redis_url="").redis_url == ""  # unset, as before (corral up starts a private Redis)


def test_the_client_asks_the_sentinels_for_the_primary_with_the_usual_timeouts() -> None:
    client = redis_client("redis+sentinel://:pw@s1:1,s2:2/mymaster/4?sentinel_password=sp")
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster" and pool.is_master
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["socket_connect_timeout"], kwargs["socket_timeout"]) == (
        4, "pw", 5.0, 10.0)
    assert kwargs["retry"].get_retries() == 0  # see the module: no command is run twice behind the caller's back
    sentinels = pool.sentinel_manager.sentinels
    assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in sentinels] == [("s1", 1), ("s2", 2)]
    assert all(s.connection_pool.connection_kwargs["password"] == "sp" for s in sentinels)
    plain = redis_client("redis://h:7/3").connection_pool.connection_kwargs
    assert (plain["host"], plain["port"], plain["db"], plain["retry"].get_retries()) == ("h", 7, 3, 0)


def test_celery_gets_kombus_sentinel_transport() -> None:
    broker, options = celery_broker("redis+sentinel://u:p%40ss@s1,[::1]:26380/mymaster/3?sentinel_password=sp")
    assert broker == "sentinel://u:p%40ss@s1:26379/3;sentinel://u:p%40ss@[::1]:26380/3"
    assert options["master_name"] == "mymaster" and options["sentinel_kwargs"]["password"] == "sp"
    conn = Connection(broker, transport_options=options)
    assert conn.transport_cls == "sentinel" and (conn.userid, conn.password, conn.virtual_host) == ("u", "p@ss", "3")
    assert conn.alt == broker.split(";")
    assert celery_broker("redis://h:6379/0") == ("redis://h:6379/0", {})


def test_the_celery_app_and_the_rate_limits_use_the_sentinels() -> None:
    from api.governance import Governor
    from corral.broker import make_celery

    settings = Settings(redis_url="redis+sentinel://s1,s2/mymaster/2")
    default, current = celery_state.default_app, celery_state.get_current_app()
    try:
        app = make_celery(settings)
        assert app.conf.broker_url.startswith("sentinel://s1:26379/2;")
        assert app.conf.broker_transport_options["master_name"] == "mymaster"
        assert app.conf.broker_transport_options["queue_order_strategy"] == "priority"  # still there beside them
    finally:  # make_celery makes its app this process's default: the other tests keep theirs
        celery_state.set_default_app(default)
        celery_state._set_current_app(current)
    storage = Governor(settings, keys=None)._storage_()  # type: ignore[arg-type]
    assert isinstance(storage.get_connection().connection_pool, SentinelConnectionPool)
