"""The runtime: the one request path every front end calls.

:class:`~acd_engine.runtime.engine.Engine` owns the model, tokenizer, pack, options, lock and
backend; ``calls`` queues, coalesces (``coalesce``) and batches calls and runs them through
the backend; ``answer`` turns tokens into text, stream chunks and results; ``scoring`` scores
continuations by the same routing.

Imports everything below it (top level, ``loading``, ``safety``, ``backends``); the front
ends (``cli``, ``training``, ``eval`` and ``acd_integrations``) import it.
"""
