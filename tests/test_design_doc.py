"""docs/design.md says what dcp.control says: the doc cannot drift from the code.

* the two permission tables of "### Permissions" (rows: ops; columns: "before hello"
  and the roles; cells: ``allowed`` or the refusal code) equal :data:`dcp.control.BROKER`
  and :data:`dcp.control.ORCHESTRATOR` for every (role, op);
* the message tables of "## Control protocol" (columns ``op``, ``message``, ``fields``)
  name every op of dcp.control and document every message type, each with its op, its
  fields (``name: kind``, ``?`` optional, ``= default``) and, for a request, its reply
  type and the daemons whose table lets someone send it;
* the kinds table names every field kind.

A changed cell in the doc, or a changed table or message in the code, fails here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from dcp import control

DOC = Path(__file__).resolve().parents[1] / "docs" / "design.md"
SECTION = "## Control protocol"
BEFORE_HELLO = "before hello"
ALLOWED = "allowed"
#: The permission tables, by the line that introduces each in the doc.
TABLES = {"BROKER": control.BROKER, "ORCHESTRATOR": control.ORCHESTRATOR}
#: Every field kind of dcp.control, by its name in the doc (the constant's, lower case).
KINDS = {name.lower(): getattr(control, name) for name in control.__all__ if isinstance(getattr(control, name), control.Kind)}
#: Every message type (the bases aside).
MESSAGE_TYPES = {
    name: obj for name, obj in vars(control).items()
    if isinstance(obj, type) and issubclass(obj, control.Message)
    and obj not in (control.Message, control.Request, control.Reply, control.ElementPush)
}
#: Every op name dcp.control defines: its constants, and the ops of its registries.
OP_NAMES = {
    value for name in control.__all__ if name.isupper() and isinstance(value := getattr(control, name), str)
} | set(control.REQUESTS) | set(control.ANSWERS)
FIELD = re.compile(r"^(?P<name>\w+): (?P<kind>\w+)(?P<optional>\?)?(?: = (?P<default>.+))?$")


class Table(NamedTuple):
    lead: str  # the last non-blank line before the table
    header: list[str]
    rows: list[tuple[int, list[str]]]  # (line index in the text, cells)


def section(text: str) -> list[str]:
    """The lines of "## Control protocol", up to the next section of its level."""
    lines = text.split("\n")
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def tables(lines: list[str]) -> list[Table]:
    """The markdown tables of ``lines``, each with the line before it."""
    found: list[Table] = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("|"):
            i += 1
            continue
        lead = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        header = cells(lines[i])
        assert i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= set("-: "), f"no separator under {lines[i]!r}"
        rows = []
        i += 2
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            row = cells(lines[i])
            assert len(row) == len(header), f"{len(row)} cells, {len(header)} columns: {lines[i]!r}"
            rows.append((i, row))
            i += 1
        found.append(Table(lead, header, rows))
    return found


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def unquoted(cell: str) -> str:
    return cell.strip().strip("`")


# --------------------------------------------------------------------------- permissions


def permission_table(lines: list[str], name: str) -> Table:
    [table] = [t for t in tables(lines) if f"`dcp.control.{name}`" in t.lead]
    return table


def permissions_in(lines: list[str], name: str) -> dict[tuple[str, str], str]:
    """(role, op) -> "" (allowed) or the refusal code, as the doc's table says."""
    table = permission_table(lines, name)
    assert table.header[0] == "op", table.header
    roles = ["" if column == BEFORE_HELLO else unquoted(column) for column in table.header[1:]]
    said: dict[tuple[str, str], str] = {}
    for _, row in table.rows:
        op = unquoted(row[0])
        for role, cell in zip(roles, row[1:]):
            assert cell == ALLOWED or re.fullmatch(r"`\w+`", cell), f"cell {cell!r} ({op}, {role or BEFORE_HELLO}): 'allowed' or a `code`"
            assert (role, op) not in said, f"{op} twice in the {name} table"
            said[(role, op)] = "" if cell == ALLOWED else unquoted(cell)
    return said


def permissions_of(table: control.Permissions) -> dict[tuple[str, str], str]:
    return {(role, op): code for role, op, code in table.pairs()}


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return section(DOC.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", TABLES)
def test_the_doc_permission_table_is_the_codes(lines: list[str], name: str) -> None:
    table = TABLES[name]
    said = permissions_in(lines, name)
    header = permission_table(lines, name).header
    assert ["" if c == BEFORE_HELLO else unquoted(c) for c in header[1:]] == list(table.roles), "the columns: before hello, then the roles"
    assert [op for role, op in said if role == ""] == list(table.rows), "the rows: every op of the table, in its order"
    wrong = {pair: (code, table.code(*pair)) for pair, code in said.items() if code != table.code(*pair)}
    assert not wrong, f"(role, op): (the doc's cell, the code's) {wrong}"
    assert said == permissions_of(table)


@pytest.mark.parametrize("name", TABLES)
def test_any_one_changed_cell_is_caught(lines: list[str], name: str) -> None:
    """The check is not vacuous: each cell of the doc's table, changed alone (an allowed
    pair refused, a refusal allowed), makes the doc disagree with the code."""
    table = permission_table(lines, name)
    expected = permissions_of(TABLES[name])
    changed = 0
    for index, row in table.rows:
        for column in range(1, len(row)):
            cells_now = list(row)
            cells_now[column] = "`not_admin`" if row[column] == ALLOWED else ALLOWED
            mutated = list(lines)
            mutated[index] = "| " + " | ".join(cells_now) + " |"
            assert permissions_in(mutated, name) != expected, (row[0], table.header[column])
            changed += 1
    assert changed == len(TABLES[name].rows) * len(TABLES[name].roles)


def test_the_doc_says_what_require_token_changes(lines: list[str]) -> None:
    text = " ".join(lines)
    assert "--require-token" in text and "`requiring_token()`" in text and "`token_missing`" in text
    for table in TABLES.values():  # what the sentence says: only "before hello" changes, to token_missing but hello
        strict = table.requiring_token()
        for role, op, code in table.pairs():
            assert strict.code(role, op) == (code if role or op == control.HELLO else "token_missing")


# --------------------------------------------------------------------------- messages


def message_tables(lines: list[str]) -> list[Table]:
    return [t for t in tables(lines) if t.header[:3] == ["op", "message", "fields"]]


def documented_fields(cell: str) -> dict[str, tuple[str, bool, Any]]:
    """name -> (kind, required, default) of a fields cell: `name: kind`, `name: kind?`, `name: kind = default`."""
    fields: dict[str, tuple[str, bool, Any]] = {}
    if cell == "-":
        return fields
    for span in code_spans(cell):
        match = FIELD.match(span)
        assert match, f"field {span!r}: `name: kind`, `name: kind?` or `name: kind = default`"
        default = match["default"]
        required = match["optional"] is None and default is None
        fields[match["name"]] = (match["kind"], required, None if default is None else json.loads(default))
    return fields


def fields_of(cls: type[control.Message]) -> dict[str, tuple[str, bool, Any]]:
    """What the doc should say of ``cls``'s fields (``id`` and ``re`` are said once for all)."""
    names = {id(kind): name for name, kind in KINDS.items()}
    fields = {}
    for f in dataclasses.fields(cls):
        if f.name == "id" and issubclass(cls, control.Request) or f.name == "re" and issubclass(cls, control.Reply):
            continue
        required = f.default is dataclasses.MISSING
        fields[f.name] = (names[id(f.metadata["kind"])], required, None if required else f.default)
    return fields


def test_every_op_of_dcp_control_is_in_the_doc_op_tables(lines: list[str]) -> None:
    documented = {unquoted(row[0]) for table in message_tables(lines) for _, row in table.rows}
    assert OP_NAMES - documented == set(), "ops of dcp.control missing from the doc's op tables"
    assert documented - OP_NAMES == {"-"}, "ops in the doc that dcp.control does not have"


def test_every_message_is_documented_with_its_op_and_fields(lines: list[str]) -> None:
    seen: dict[str, int] = {}
    for table in message_tables(lines):
        for _, row in table.rows:
            name = unquoted(row[1])
            assert name in MESSAGE_TYPES, f"{name!r} is not a message type of dcp.control"
            cls = MESSAGE_TYPES[name]
            seen[name] = seen.get(name, 0) + 1
            assert unquoted(row[0]) == (cls.op or "-"), f"{name} has op {cls.op!r}"
            assert documented_fields(row[2]) == fields_of(cls), f"the fields of {name}"
            columns = dict(zip(table.header, row))
            if "reply" in columns:
                assert issubclass(cls, control.Request), name
                assert code_spans(columns["reply"])[0] == cls.reply.__name__, f"the reply of {name}"
            if "to" in columns:
                daemons = {"both": {"broker", "orchestrator"}}.get(columns["to"], {columns["to"]})
                assert daemons == {t.daemon for t in TABLES.values() if cls.op in t.rows}, f"who takes {cls.op}"
    assert set(MESSAGE_TYPES) - set(seen) == set(), "message types missing from the doc"
    assert [name for name, count in seen.items() if count > 1] == [], "message types documented twice"


def test_every_field_kind_is_in_the_kinds_table(lines: list[str]) -> None:
    [table] = [t for t in tables(lines) if t.header[0] == "kind"]
    documented = [kind for _, row in table.rows for kind in code_spans(row[0])]
    assert sorted(documented) == sorted(KINDS)
