"""Structured outputs on the wire: ``response_format``, vLLM's ``structured_outputs`` and ``guided_*``.

One request names at most one constraint, in any of these spellings (the same on chat and completions):

* OpenAI's ``response_format``: ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}``, vLLM's ``{"type": "structural_tag", ...}``; ``text`` is no constraint;
* vLLM's ``structured_outputs`` object (:class:`StructuredOutputsParams`' fields); when it names no
  constraint kind, its options (``disable_any_whitespace``, ...) apply to the constraint another spelling
  gives;
* vLLM's older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``, with
  ``guided_whitespace_pattern`` and ``guided_decoding_backend`` (``xgrammar`` or ``auto``).

:func:`structured_outputs_of` returns the :class:`StructuredOutputsParams` and the wire field it came
from; :func:`check_compiles` compiles it before the request enters the engine (cached for it), so a
schema, regex or grammar that does not compile is a 400 naming that field and the problem.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from dockyard.engine.llm import LLM
from dockyard.errors import InvalidRequestError
from dockyard.server.errors import APIError
from dockyard.server.protocol import SamplingFields
from dockyard.structured_output.params import KINDS, PARAM, StructuredOutputsParams

BACKENDS = ("auto", "xgrammar")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _from_response_format(req: SamplingFields) -> tuple[dict[str, Any], str] | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}, "response_format"
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise _invalid("response_format.json_schema", "response_format of type json_schema needs "
                           "json_schema.schema (the JSON schema the output must follow)")
        return {"json": fmt.json_schema.json_schema}, "response_format.json_schema.schema"
    if fmt.type == "structural_tag":
        if fmt.format is not None:
            tag: dict[str, Any] = {"type": "structural_tag", "format": fmt.format}
        elif fmt.structures is not None and fmt.triggers is not None:
            tag = {"structures": fmt.structures, "triggers": fmt.triggers}
        else:
            raise _invalid("response_format", "response_format of type structural_tag needs either format, or "
                                              "structures and triggers")
        return {"structural_tag": json.dumps(tag)}, "response_format"
    raise _invalid("response_format.type", f"response_format type {fmt.type!r} is not one of text, json_object, "
                                           "json_schema, structural_tag")


def structured_outputs_of(req: SamplingFields) -> tuple[StructuredOutputsParams | None, str]:
    """The request's constraint (None when it has none) and the wire field that names it; a 400 naming the
    field when two spellings set a constraint or a value is malformed."""
    if req.guided_decoding_backend not in (None, *BACKENDS):
        raise _invalid("guided_decoding_backend", f"guided_decoding_backend {req.guided_decoding_backend!r} is not "
                                                  f"available; this server uses xgrammar (give one of {BACKENDS})")
    sources: list[tuple[dict[str, Any], str]] = []
    from_format = _from_response_format(req)
    if from_format is not None:
        sources.append(from_format)
    options: dict[str, Any] = {}
    if req.structured_outputs is not None:
        given = dict(req.structured_outputs)
        if any(given.get(k) not in (None, False) for k in KINDS):
            sources.append((given, PARAM))
        else:
            options = {k: v for k, v in given.items() if k not in KINDS}
    for name, kind in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            sources.append(({kind: value}, name))
    if req.guided_whitespace_pattern is not None:
        options["whitespace_pattern"] = req.guided_whitespace_pattern
    if len(sources) > 1:
        names = ", ".join(wire for _, wire in sources)
        raise _invalid(sources[1][1], f"give one structured-output constraint, not several ({names})")
    if not sources:
        if options:
            raise _invalid(PARAM, f"{PARAM} sets only options ({', '.join(sorted(options))}) and no constraint: "
                                  f"add one of {', '.join(KINDS)}, response_format or a guided_* field")
        return None, ""
    fields, wire = sources[0]
    try:
        params = StructuredOutputsParams.from_dict({**options, **fields})
    except (InvalidRequestError, TypeError) as exc:
        param = getattr(exc, "param", None) or PARAM
        raise _invalid(_wire_param(param, wire), _wire_message(str(exc), param, wire)) from None
    return params, wire


def _wire_param(param: str, wire: str) -> str:
    """The request's own name of a ``structured_outputs.<field>`` parameter: a constraint kind is named as
    the field that gave it; options keep their structured_outputs name."""
    if wire == PARAM:
        return param
    field = param.removeprefix(f"{PARAM}.")
    return wire if field in KINDS or param == PARAM else param


def _wire_message(message: str, param: str, wire: str) -> str:
    name = _wire_param(param, wire)
    return name + message[len(param):] if message.startswith(param) else message


async def check_compiles(llm: LLM, params: StructuredOutputsParams, wire: str) -> None:
    """Compile ``params`` on the engine's grammar threads (cached for the request that follows); a 400
    naming ``wire`` when it does not compile."""
    try:
        await asyncio.wrap_future(llm.engine.structured_output.compile(params))
    except InvalidRequestError as exc:
        param = exc.param or PARAM
        raise _invalid(_wire_param(param, wire), _wire_message(str(exc), param, wire)) from None
