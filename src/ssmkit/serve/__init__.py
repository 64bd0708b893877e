"""``ssmkit serve``: an OpenAI-compatible HTTP server whose memory per conversation does not grow.

A Mamba model's recurrent state has a fixed size whatever the length of the conversation (per layer
conv_state (E·D, d_conv) + ssm_state (E·D, N) numbers), so a server can hold many concurrent streams at a
known, constant memory each and decode them together. The modules, bottom to top:

    text      incremental detokenization and OpenAI stop strings, in bounded memory
    chat      chat templates (Jinja, as transformers renders them)
    engine    the decode thread: continuous batching over ``Cache.cat`` / ``Cache.select``
    protocol  OpenAI request checks, response / chunk / error bodies
    app       the FastAPI routes (/v1/completions, /v1/chat/completions, /v1/models, /health)
    server    ServeConfig, loading the model folder, uvicorn

Glossary: D d_model; E expand; N d_state; stream — one request's generation.
"""
