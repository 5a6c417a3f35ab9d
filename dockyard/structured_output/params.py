"""StructuredOutputsParams: the constraint a request puts on its output (vLLM's shape and names).

Exactly one constraint kind is set: ``json`` (a JSON schema, as a dict or its JSON text), ``regex``,
``choice`` (the output is one of these strings), ``grammar`` (EBNF as xgrammar reads it, the GBNF
dialect), ``json_object`` (any JSON object) or ``structural_tag`` (xgrammar's structural-tag JSON: tagged
regions whose content follows a schema, free text elsewhere). The options are vLLM's:
``disable_any_whitespace`` (JSON without free whitespace between tokens: one space after ``,`` and ``:``),
``disable_additional_properties`` (objects hold only the properties their schema names; always so with
xgrammar's strict mode), ``disable_fallback`` (accepted: there is one backend, so never a fallback),
``whitespace_pattern`` (refused: xgrammar has no whitespace regex; use ``disable_any_whitespace``).
For a reasoning model, ``reasoning_end_token_ids`` (the token ids that end its reasoning, e.g. those of
``</think>``; the server fills it from ``--reasoning-parser``) makes the constraint start after the output
has written them, unless the prompt already closed the reasoning (its last end sequence after its last
``reasoning_start_token_ids``); see ``reasoning_gate``. They do not change the compiled grammar.
Values are checked when the object is made (:class:`~dockyard.errors.InvalidRequestError` naming
``structured_outputs.<field>``); whether a schema, regex or grammar compiles is the backend's check.
No grammar library is imported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from dockyard.errors import InvalidRequestError

# The constraint kinds, in the order their names appear in messages.
KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
PARAM = "structured_outputs"


def _bad(name: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{PARAM}.{name} {message}", param=f"{PARAM}.{name}")


@dataclass
class StructuredOutputsParams:
    """One structured-output constraint of a request; see the module docstring."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    reasoning_end_token_ids: list[int] | None = None
    reasoning_start_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as exc:
                    raise _bad("json", f"is not valid JSON: {exc}; give a JSON schema") from None
            else:
                schema = self.json
            if not isinstance(schema, dict | bool):
                raise _bad("json", f"must be a JSON schema (an object), got {type(schema).__name__}")
        for name in ("regex", "grammar", "structural_tag", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _bad(name, f"must be a non-empty string, got {value!r}")
        if self.choice is not None:
            if (isinstance(self.choice, str) or not isinstance(self.choice, list | tuple) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise _bad("choice", f"must be a non-empty list of non-empty strings, got {self.choice!r}")
            self.choice = list(self.choice)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise _bad("json_object", f"must be true or false, got {self.json_object!r}")
        for name in ("disable_fallback", "disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, f"must be true or false, got {getattr(self, name)!r}")
        for name in ("reasoning_end_token_ids", "reasoning_start_token_ids"):
            ids = getattr(self, name)
            if ids is not None:
                if (isinstance(ids, str) or not isinstance(ids, list | tuple) or not ids
                        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
                    raise _bad(name, f"must be a non-empty list of token ids (integers >= 0), got {ids!r}")
                setattr(self, name, list(ids))
        if self.reasoning_start_token_ids is not None and self.reasoning_end_token_ids is None:
            raise _bad("reasoning_start_token_ids", "needs reasoning_end_token_ids (the sequence that ends the "
                                                    "reasoning); give both or neither")
        if self.whitespace_pattern is not None:
            raise _bad("whitespace_pattern", "is not supported by the xgrammar backend; use "
                                             "disable_any_whitespace=true for JSON without free whitespace")
        kinds = self.kinds
        if len(kinds) != 1:
            raise InvalidRequestError(
                f"{PARAM} must set exactly one of {', '.join(KINDS)}; got "
                + (", ".join(kinds) if kinds else "none"), param=PARAM)

    @property
    def kinds(self) -> list[str]:
        """The constraint kinds set (a valid object has exactly one)."""
        return [k for k in KINDS if getattr(self, k) not in (None, False)]

    @property
    def kind(self) -> str:
        """The constraint kind: one of ``KINDS``."""
        return self.kinds[0]

    @property
    def schema(self) -> dict | bool | None:
        """The JSON schema as an object (``json`` only)."""
        return json.loads(self.json) if isinstance(self.json, str) else self.json

    def cache_key(self) -> str:
        """A canonical text of everything that decides the compiled grammar (equal keys compile alike)."""
        value: Any = self.schema if self.kind == "json" else getattr(self, self.kind)
        return json.dumps([self.kind, value, self.disable_any_whitespace], sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, value: Any, param: str = PARAM) -> StructuredOutputsParams:
        """Build from a JSON object (the server's ``structured_outputs`` field), refusing unknown keys."""
        if isinstance(value, StructuredOutputsParams):
            return value
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{param} must be an object, got {type(value).__name__}", param=param)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequestError(f"{param} has unknown fields {unknown}; known: {sorted(known)}", param=param)
        return cls(**value)
