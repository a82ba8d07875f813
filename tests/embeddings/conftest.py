from tests.router.conftest import redis_server, tokenizer  # noqa: F401  (the real redis-server, the real tokenizer)
