"""A request's fields are declared once, by protocol.ChatRequest; the client's keywords, the docs'
table and the kiosk's requests are checked against that declaration."""

from __future__ import annotations

import re
import typing

from devtools.harness import ROOT
from qwen_edge.protocol import REQUEST_ENVELOPE, REQUEST_OPTIONS, ChatRequest, RequestOptions


def test_the_clients_keywords_are_the_requests_options() -> None:
    # max_tokens is stream()'s and ask()'s positional parameter; the rest are RequestOptions.
    assert set(typing.get_type_hints(RequestOptions)) | {"max_tokens"} == REQUEST_OPTIONS


def test_the_protocol_docs_table_lists_every_field_and_no_other() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split("\n## Request\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("\n\n|", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \|", "|" + table, flags=re.MULTILINE)
    assert set(rows) == REQUEST_ENVELOPE | REQUEST_OPTIONS
    assert set(rows) == set(ChatRequest.model_fields)


def test_the_kiosk_sends_only_fields_the_node_declares() -> None:
    source = (ROOT / "deploy" / "kiosk" / "src" / "config.js").read_text()
    body = source.split("export function buildRequest", 1)[1].split("\n}\n", 1)[0]
    literal = re.search(r"const req = \{([^}]*)\}", body)
    assert literal is not None
    sent = {k.split(":")[0].strip() for k in literal.group(1).split(",") if k.strip()}
    sent |= set(re.findall(r"\breq\.(\w+) =", body))
    assert sent, "no fields found: the kiosk's buildRequest changed shape"
    assert sent <= REQUEST_ENVELOPE | REQUEST_OPTIONS, sent - (REQUEST_ENVELOPE | REQUEST_OPTIONS)
