"""Constrained output: JSON mode, JSON Schema and raw GBNF, all enforced by llama.cpp's grammar
sampler. This module only produces GBNF text; the sampler chain compiles it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from freehold.errors import InvalidInput

if TYPE_CHECKING:
    from freehold.engine.sampling import SamplingParams

# Any JSON object. Whitespace is bounded so a small model cannot pad forever inside the grammar.
JSON_OBJECT_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws
array  ::= "[" ws ( value ( "," ws value )* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\"" ws
number ::= "-"? ( [0-9] | [1-9] [0-9]{1,15} ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]{1,3} )? ws
ws     ::= | " " | "\n" [ \t]{0,20}
"""


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """Convert a JSON Schema to GBNF (llama.cpp's converter); InvalidInput if unsupported."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if not isinstance(schema, dict):
        raise InvalidInput("json_schema must be a JSON object describing the output")
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises assorted errors for unsupported keywords
        raise InvalidInput(f"json_schema could not be turned into a grammar: {e}") from None


def gbnf_for(params: SamplingParams) -> str | None:
    """The GBNF a request's constraint needs, or None when output is unconstrained."""
    if params.grammar is not None:
        if "root" not in params.grammar:
            raise InvalidInput("a GBNF grammar needs a rule named 'root'")
        return params.grammar
    if params.json_schema is not None:
        return schema_to_gbnf(params.json_schema)
    if params.json_mode:
        return JSON_OBJECT_GBNF
    return None
