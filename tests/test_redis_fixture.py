import redis

from tests.redis_proc import RedisProcess


def test_session_redis_is_private_and_writable(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.connection_pool.connection_kwargs["port"] != 6379
    client.set("dare:fixture", b"ok")
    assert client.get("dare:fixture") == b"ok"
    client.close()


def test_restartable_redis_stops_and_starts(redis_process: RedisProcess) -> None:
    client = redis.Redis.from_url(redis_process.url, socket_timeout=1)
    assert client.ping()
    redis_process.stop()
    try:
        client.ping()
        raise AssertionError("ping succeeded with redis-server stopped")
    except redis.ConnectionError:
        pass
    redis_process.start()
    assert client.ping()
    client.close()
