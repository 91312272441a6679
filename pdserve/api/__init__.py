"""pdserve.api: the OpenAI/SGLang API layer shared by the router and the workers.

Modules (import what you need; this package imports nothing eagerly):

- ``protocol``: request models (chat, completions, SGLang ``/generate``) and ``parse_request``.
- ``responses``: response and stream-chunk models (documentation / validation; the hot path
  builds dicts).
- ``backend``: ``GenerateBackend`` and ``ChatTokenizer`` protocols, ``RequestContext``,
  ``BootstrapInfo``.
- ``serving``: ``OpenAIServing`` (chat, completions, models); ``native_serving``:
  ``NativeServing`` (worker ``/generate``); ``routes``: ``api_router`` mounting both on FastAPI.
- ``errors``: ``install_error_handlers`` and ``BodySizeLimitMiddleware``.
- ``chat``, ``reasoning``, ``tool_parsers``, ``tools``: templating, the ``glm45`` reasoning
  parser, the ``glm45``/``glm47`` tool-call parsers, tool validation and argument typing.
- ``native``: SGLang native wire format (request mapping, writer, parser for both streaming modes).
- ``sse``: SSE framing and an incremental decoder; ``testing``: test doubles; ``bench_api``: costs.
"""
