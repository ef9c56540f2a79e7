"""`fastinf serve`: the engine over HTTP.

    from fastinf.service import create_app, serve
    serve(create_app(engine))          # or `fastinf serve` on the command line

Modules: `config` (ServiceConfig), `inputs` (request checks: images, k, cond), `batcher`
(micro-batching behind a bounded queue), `app` (the routes, metrics and the page in
`static/index.html`).
"""

from ..lazy import lazy_exports

# Public name → its module, imported on first use (the parser reads `config` only).
_EXPORTS = {
    "Service": "app",
    "ServiceConfig": "config",
    "create_app": "app",
    "serve": "app",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
