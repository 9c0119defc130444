"""Model loading: ``registry.load_model`` resolves ``--model`` to a ``base.LoadedModel``.

Kept import-light on purpose: the gRPC server imports this package before torch is loaded, so
health can answer NOT_SERVING while the (slow) torch import and model load run.
"""

DEFAULT_MODEL = "smollm2-135m-instruct"
