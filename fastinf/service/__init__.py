"""`fastinf serve`: the engine over HTTP (`app.create_app`), with micro-batching
(`batcher`), request checks (`inputs`) and a web page (`static/index.html`)."""

from .app import Service, ServiceConfig, create_app, serve

__all__ = ["Service", "ServiceConfig", "create_app", "serve"]
