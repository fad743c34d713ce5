"""kiq's producer side: the Python client and the `kiq` CLI. Light: celery, redis, pydantic only."""

from producer.client import Client

__all__ = ["Client"]
