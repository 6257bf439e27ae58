"""Filters on a search: a label (a bound parameter) and `--where` (a user's SQL condition), kept inside one collection.

`--where` is SQL text, so it cannot be bound. PostgreSQL's own grammar reads it (pglast wraps libpg_query, the
server's parser) as the condition of `SELECT 1 FROM images WHERE <text>`, and the one expression found there must
be built from an allow-list: the columns of images, constants, comparison and arithmetic operators, AND/OR/NOT,
IN lists, BETWEEN, LIKE/ILIKE/SIMILAR TO, IS [NOT] NULL, CASE, COALESCE, casts to plain types and a few pure
functions. Anything else (a sub-select, another table, a system column, a parameter, an unlisted function or type)
is refused with one line naming it. What runs is never the text as typed: it is the checked tree written back as
SQL, with functions and types pinned to pg_catalog, parsed again and compared with what was checked.
That condition filters a subquery already restricted to the collection (`scoped`), and it runs on the reader
connection (ingest.reader): a login that can only SELECT, in a read-only transaction, under a statement timeout.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from pglast import ast, enums, parse_sql
from pglast.parser import ParseError
from pglast.stream import RawStream

from ingest.errors import FilterError

SKELETON = "SELECT 1 FROM images WHERE "
TABLE = "images"
OPERATORS = frozenset({"=", "<>", "!=", "<", ">", "<=", ">=", "+", "-", "*", "/", "%", "^", "||",
                       "~", "~*", "!~", "!~*", "~~", "~~*", "!~~", "!~~*"})
FUNCTIONS = frozenset({
    "lower", "upper", "initcap", "length", "char_length", "character_length", "octet_length", "bit_length",
    "substr", "substring", "left", "right", "strpos", "position", "starts_with", "replace", "reverse", "split_part",
    "btrim", "ltrim", "rtrim", "lpad", "rpad", "overlay", "concat", "concat_ws", "md5",
    "abs", "sign", "round", "trunc", "floor", "ceil", "ceiling", "sqrt", "mod", "power",
    "extract", "date_part", "date_trunc", "like_escape", "similar_to_escape",
})
TYPES = frozenset({"bool", "int2", "int4", "int8", "float4", "float8", "numeric", "text", "varchar", "bpchar",
                   "date", "time", "timetz", "timestamp", "timestamptz", "interval"})
REFUSED = {  # node kinds a condition might hold, as the refusal names them
    "SubLink": "a sub-select", "RangeVar": "a table reference", "ParamRef": "a parameter ($1)",
    "A_Indirection": "subscripts or field selection", "A_Star": "*", "CollateClause": "COLLATE",
    "RowExpr": "a row constructor", "SQLValueFunction": "a session value such as current_user",
    "NamedArgExpr": "named arguments", "GroupingFunc": "GROUPING", "SetToDefault": "DEFAULT",
}


@dataclass(frozen=True)
class Filter:
    """Which rows of a collection may be neighbours: a label, a checked --where, and images to leave out (the
    query's own stored pictures)."""

    label: str | None = None
    where: str | None = None
    exclude: tuple[int, ...] = ()

    @classmethod
    def of(cls, label: str | None = None, where: str | None = None, exclude: int | Iterable[int] | None = None) -> "Filter":
        """`exclude`: one image id, several, or None."""
        ids = () if exclude is None else tuple(map(int, exclude)) if isinstance(exclude, Iterable) else (int(exclude),)
        return cls(label, check_where(where) if where is not None else None, ids)

    @property
    def narrows(self) -> bool:
        """True if the filter may leave fewer rows than the collection has (not counting the excluded query)."""
        return self.label is not None or self.where is not None

    def scoped(self, columns: str, scope: str, collection_id: int) -> str:
        """SELECT `columns` FROM the collection's rows (`scope`: conditions on images with bound parameters)
        WHERE this filter holds. Parameters: %(label)s, %(exclude)s, and scope's own. The collection id is a literal
        (an int), so the plan holds its partition alone even when psycopg prepares the statement (ingest/partitions.py).

        The checked condition is psycopg-escaped (% doubled) so it can add no parameters of its own.
        """
        conditions = []
        if self.label is not None:
            conditions.append("images.label = %(label)s")
        if self.exclude:
            conditions.append("images.id <> ALL(%(exclude)s)")
        if self.where is not None:
            conditions.append("(" + self.where.replace("%", "%%") + ")")
        where = " AND ".join(conditions) or "true"
        return f"SELECT {columns} FROM (SELECT * FROM images WHERE collection_id = {int(collection_id)} AND {scope}) AS images WHERE {where}"

    def params(self, collection_id: int) -> dict:
        return {"c": collection_id, "label": self.label, "exclude": list(self.exclude)}


@lru_cache(maxsize=512)
def check_where(text: str) -> str:
    """The SQL to run for a user's condition: its checked expression, deparsed; a FilterError says what is refused."""
    if not text.strip():
        raise FilterError("--where is empty")
    checked = expression_of(text)
    sql = RawStream()(checked)
    if expression_of(sql) != checked:  # the SQL sent reads back as the tree that was checked, or it does not run
        raise FilterError("--where could not be written back as the condition that was checked")
    return sql


def expression_of(text: str) -> ast.Node:
    """The one expression `text` is as the WHERE of a query on images, checked and with names pinned to pg_catalog."""
    try:
        statements = parse_sql(SKELETON + text)
    except ParseError as e:
        raise FilterError(f"--where is not a SQL condition: {e.args[0]}") from None
    if len(statements) != 1 or statements[0].stmt_len:  # a `;` ends the statement before the text does
        raise FilterError("--where is one condition: it may not contain ';'")
    select = statements[0].stmt
    condition = getattr(select, "whereClause", None)
    if condition is not None:
        select.whereClause = None
    if condition is None or select != skeleton():
        raise FilterError("--where is one condition: no clauses (ORDER BY, UNION, ...) may follow it")
    check(condition)
    return condition


@lru_cache(maxsize=1)
def skeleton() -> ast.SelectStmt:
    """`SELECT 1 FROM images` as parsed: what a statement must be once its WHERE is taken away."""
    stmt = parse_sql(SKELETON + "true")[0].stmt
    stmt.whereClause = None
    return stmt


@lru_cache(maxsize=1)
def columns() -> frozenset[str]:
    """The columns of images a condition may use: the model's, so a column added by a migration is usable at once."""
    from ingest.models import Image

    return frozenset(column.name for column in Image.__table__.columns)


def check(node) -> None:
    """Refuse anything outside the allow-list, walking the whole expression."""
    if isinstance(node, tuple):
        for item in node:
            check(item)
        return
    kind = type(node).__name__
    checker = CHECKS.get(kind)
    if checker is None:
        raise FilterError(f"--where may not contain {REFUSED.get(kind, kind)}")
    checker(node)


def check_column(node: ast.ColumnRef) -> None:
    names = [getattr(f, "sval", None) for f in node.fields]
    if any(n is None for n in names):
        raise FilterError("--where may not contain *")
    if len(names) == 2 and names[0] != TABLE or len(names) > 2:
        raise FilterError(f"--where may use only columns of images, not {'.'.join(names)}")
    if names[-1] not in columns():
        raise FilterError(f"--where has no column {names[-1]!r}; images has {', '.join(sorted(columns()))}")


def check_operator(node: ast.A_Expr) -> None:
    kind = node.kind
    if kind in (enums.A_Expr_Kind.AEXPR_OP, enums.A_Expr_Kind.AEXPR_OP_ANY, enums.A_Expr_Kind.AEXPR_OP_ALL,
                enums.A_Expr_Kind.AEXPR_DISTINCT, enums.A_Expr_Kind.AEXPR_NOT_DISTINCT, enums.A_Expr_Kind.AEXPR_NULLIF,
                enums.A_Expr_Kind.AEXPR_IN, enums.A_Expr_Kind.AEXPR_LIKE, enums.A_Expr_Kind.AEXPR_ILIKE,
                enums.A_Expr_Kind.AEXPR_SIMILAR):
        names = [n.sval for n in node.name]
        if len(names) != 1 or names[0] not in OPERATORS:
            raise FilterError(f"--where may not use the operator {'.'.join(names)}")
    elif kind not in (enums.A_Expr_Kind.AEXPR_BETWEEN, enums.A_Expr_Kind.AEXPR_NOT_BETWEEN,
                      enums.A_Expr_Kind.AEXPR_BETWEEN_SYM, enums.A_Expr_Kind.AEXPR_NOT_BETWEEN_SYM):
        raise FilterError(f"--where may not use {kind.name}")
    for side in (node.lexpr, node.rexpr):
        if side is not None:
            check(side)


def check_function(node: ast.FuncCall) -> None:
    names = [n.sval for n in node.funcname]
    if len(names) > 2 or len(names) == 2 and names[0] != "pg_catalog" or names[-1] not in FUNCTIONS:
        raise FilterError(f"--where may not call {'.'.join(names)}(); allowed: {', '.join(sorted(FUNCTIONS))}")
    if node.agg_order or node.agg_filter or node.over or node.agg_star or node.agg_distinct or node.func_variadic \
            or node.agg_within_group:
        raise FilterError(f"--where may call {names[-1]}() only as a plain function")
    node.funcname = (ast.String(sval="pg_catalog"), ast.String(sval=names[-1]))
    node.funcformat = enums.CoercionForm.COERCE_EXPLICIT_CALL  # written back as a call, which reads back the same
    check(node.args or ())


def check_cast(node: ast.TypeCast) -> None:
    type_name = node.typeName
    names = [n.sval for n in type_name.names]
    if len(names) > 2 or len(names) == 2 and names[0] != "pg_catalog" or names[-1] not in TYPES \
            or type_name.setof or type_name.pct_type or type_name.arrayBounds:
        raise FilterError(f"--where may not cast to {'.'.join(names)}{'[]' if type_name.arrayBounds else ''}; "
                          f"allowed: {', '.join(sorted(TYPES))}")
    type_name.names = (ast.String(sval="pg_catalog"), ast.String(sval=names[-1]))
    check(type_name.typmods or ())
    check(node.arg)


def check_case(node: ast.CaseExpr) -> None:
    for part in (node.arg, node.defresult):
        if part is not None:
            check(part)
    for when in node.args:
        check(when.expr)
        check(when.result)


def check_constant(node: ast.A_Const) -> None:
    """Numbers, strings, booleans, bit strings and NULL: values, whatever quoting they were written in."""


CHECKS = {
    "A_Const": check_constant,
    "ColumnRef": check_column,
    "A_Expr": check_operator,
    "BoolExpr": lambda node: check(node.args),
    "NullTest": lambda node: check(node.arg),
    "BooleanTest": lambda node: check(node.arg),
    "FuncCall": check_function,
    "TypeCast": check_cast,
    "CaseExpr": check_case,
    "CoalesceExpr": lambda node: check(node.args),
    "MinMaxExpr": lambda node: check(node.args),
    "A_ArrayExpr": lambda node: check(node.elements or ()),
}
