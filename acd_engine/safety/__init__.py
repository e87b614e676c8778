"""Safety: what makes a decode safer, independent of how the forwards run.

The contrast between branches (``contrast``), the prompt packs that hold the SP/AP soft
prompts and the gate (``prompts``, described in words by ``pack_info``), the safety gate
that reads a request and routes it (``gate``), and the application shapes a request is
placed in, shared by the gate's training and ``acd eval --context`` (``contexts``). The
method registry these read lives at the top level (``acd_engine.methods``), beside the
options that validate a method's name.

Imports the top level and ``loading``; the backends and the runtime import it.
"""
