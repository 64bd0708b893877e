"""Chat templates: a list of chat messages -> the prompt text the model was trained on.

A model folder states its conversation format as a Jinja template, as Hugging Face transformers reads it:
``tokenizer_config.json``'s ``chat_template`` (a string, or a list of ``{"name", "template"}`` of which
the one named ``"default"`` is used), or a ``chat_template.jinja`` file beside it. It is rendered as
transformers' ``apply_chat_template`` does: a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, a ``raise_exception(message)`` function and a
``tojson`` filter that keeps non-ASCII text; the variables are ``messages`` (each ``{"role",
"content"}``), ``add_generation_prompt`` (True: the prompt ends where the assistant's reply begins), and
``bos_token`` / ``eos_token`` from ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path


class TemplateError(ValueError):
    """The template refused the messages (its ``raise_exception``) or failed to render them."""


def _special_token(config: dict, key: str) -> str:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """A compiled chat template with the folder's ``bos_token`` and ``eos_token``."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        import jinja2
        import jinja2.ext
        import jinja2.sandbox

        def raise_exception(message):
            raise TemplateError(str(message))

        def tojson(value, indent=None):
            return json.dumps(value, ensure_ascii=False, indent=indent)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"chat_template: invalid Jinja (line {err.lineno}): {err.message}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_folder(cls, folder: str | Path) -> ChatTemplate | None:
        """The template of the model folder ``folder``, or None when it states none."""
        folder = Path(folder)
        config_file = folder / "tokenizer_config.json"
        config = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{config_file}: not valid JSON ({err})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if source is None and (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if source is None:
            return None
        if not isinstance(source, str):
            raise ValueError(f"{config_file}: chat_template must be a string, got {type(source).__name__}")
        return cls(source, _special_token(config, "bos_token"), _special_token(config, "eos_token"))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``; TemplateError when the template refuses them."""
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as err:
            raise TemplateError(f"the chat template failed on these messages: {err}") from None
