"""pdserve: prefill/decode-disaggregated serving for GLM-4.5/4.6/4.7-class MoE models.

Every component installs under this one namespace; the top-level folders of the repository
(``engine/``, ``kvtransfer/``, ``router/``, ``prefill_worker/``, ``decode_worker/``, ``deploy/``)
are linked in here as ``pdserve.engine``, ``pdserve.kvtransfer`` and so on.
"""

__version__ = "0.1.0"
