"""ORM queries built and compiled once per process, then run with other values.

Every agent request looks up its site's task: one row, read with its round, job and site. The
database answers in well under a millisecond; building that queryset and compiling it to SQL
(Django walks every selected column of four models, every time) cost a busy portal several
times that, the largest single cost of its request path (profiled at 100 agents). Django has
no cache of compiled queries (SQLAlchemy has one); :class:`PreparedQuery` is a small one for
such hot lookups. It compiles the queryset once per database, learns from the compiled
parameters where each value goes, and runs the same SQL again with new values, building the
model instances as ``QuerySet`` itself does (``django.db.models.query.ModelIterable``).

:class:`PreparedUpdate` does the same for a conditional ``update()`` (every upload runs one),
returning the rows it changed.

Where it cannot tell where a value goes (a value the driver gets in a form it does not know,
or SQL that changes with the values), it says so once and falls back to the plain queryset for
good: slower, never wrong. Its tests run each prepared lookup against the queryset it replaces.

It leans on Django's internals (the compiler's ``select`` and ``klass_info``,
``get_related_populators``; for an update, ``UpdateQuery`` and what
``SQLUpdateCompiler.pre_sql_setup`` would rewrite), as pinned in pyproject.toml (5.2): on an
upgrade of Django, its tests (``tests/portal/fedportal/test_prepared.py``) say whether they
still hold.
"""

from __future__ import annotations

import abc
import copy
import datetime as dt
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from django.db import connections, models, transaction
from django.db.models import sql
from django.db.models.query import get_related_populators

log = logging.getLogger(__name__)

M = TypeVar("M", bound=models.Model)


@dataclass(frozen=True)
class _Compiled:
    """A query compiled on one database: its SQL and parameters, where each value goes in
    them (and in what form), and the compiler, which knows how to turn rows into models."""

    sql: str
    params: tuple[Any, ...]
    slots: Mapping[str, tuple[tuple[int, ...], Callable[[Any], Any]]]
    compiler: Any


def _as_sent(example: Any, sent: Any, connection: Any) -> Callable[[Any], Any] | None:
    """How a value of ``example``'s kind reaches the driver, given that ``example`` reached it
    as ``sent``: unchanged; wrapped in a subclass of its type (Django gives psycopg an integer
    as ``Int4`` or ``Int8``, which say the column's size); (a UUID on a database without a
    UUID type) as its hex digits; or (a datetime on SQLite) as the database adapts a datetime
    column's value. None for anything else."""
    kind = type(sent)
    if sent == example and kind is type(example):
        return lambda value: value
    if sent == example and issubclass(kind, type(example)):
        return lambda value: kind(value)
    if isinstance(example, uuid.UUID) and sent == example.hex:
        return lambda value: value.hex
    adapt = connection.ops.adapt_datetimefield_value
    if isinstance(example, dt.datetime) and sent == adapt(example):
        return lambda value: adapt(value)
    return None


def _differs(made: Any, compiled: Any) -> bool:
    return type(made) is not type(compiled) or made != compiled


class _NotPreparable(Exception):
    """A statement of a shape that is not prepared (``_sql`` says why)."""


class _Prepared(abc.ABC):
    """SQL compiled once per database, run again with new values: the examples and the
    learning of where each value goes, shared by :class:`PreparedQuery` and
    :class:`PreparedUpdate`, which say how a statement is built (``_sql``)."""

    build: Callable[..., Any]

    def __init__(self, build: Callable[..., Any], **examples: Any) -> None:
        self.build = build
        self.examples = examples
        self._compiled: dict[tuple[str, str], _Compiled | None] = {}

    def _prepared(
        self, using: str, values: Mapping[str, Any]
    ) -> tuple[_Compiled, list[Any]] | None:
        """The statement compiled for ``using`` and its parameters with ``values``; None when
        it cannot be prepared (the caller runs the plain queryset)."""
        connection = connections[using]
        key = (using, connection.vendor)
        if key not in self._compiled:
            self._compiled[key] = self._compile(using)
        compiled = self._compiled[key]
        if compiled is None:
            return None
        params = list(compiled.params)
        for name, (positions, as_sent) in compiled.slots.items():
            for position in positions:
                params[position] = as_sent(values[name])
        return compiled, params

    @abc.abstractmethod
    def _sql(self, using: str, values: Mapping[str, Any]) -> tuple[tuple[str, list[Any]], Any]:
        """The statement built with ``values``: its SQL and parameters, and its compiler;
        :class:`_NotPreparable` for a shape that is not prepared."""

    def _compile(self, using: str) -> _Compiled | None:
        connection = connections[using]
        try:
            first, compiler = self._sql(using, self.examples)
        except _NotPreparable as exc:
            self._unprepared(str(exc))
            return None
        slots = {}
        for name, example in self.examples.items():
            other = self._other(example)
            sql, _ = self._sql(using, {**self.examples, name: other})
            if sql[0] != first[0]:
                self._unprepared(f"its SQL changes with {name}")
                return None
            positions = tuple(
                i for i, (a, b) in enumerate(zip(first[1], sql[1], strict=True)) if a != b
            )
            as_sent = _as_sent(example, first[1][positions[0]], connection) if positions else None
            if as_sent is None or any(
                _differs(as_sent(example), first[1][i]) or _differs(as_sent(other), sql[1][i])
                for i in positions
            ):
                self._unprepared(f"where {name} goes could not be told")
                return None
            slots[name] = (positions, as_sent)
        return _Compiled(sql=first[0], params=tuple(first[1]), slots=slots, compiler=compiler)

    @staticmethod
    def _other(example: Any) -> Any:
        if isinstance(example, uuid.UUID):
            return uuid.UUID(int=example.int ^ 0xFFFF)
        if isinstance(example, bool):
            raise TypeError("a prepared statement takes no booleans (two values cannot be told)")
        if isinstance(example, int):
            return example - 7919
        if isinstance(example, str):
            return example + "~"
        if isinstance(example, dt.datetime):
            return example + dt.timedelta(days=1, microseconds=7919)
        raise TypeError(
            "a prepared statement takes int, str, datetime and UUID values, not "
            f"{type(example).__name__}"
        )

    def _unprepared(self, why: str) -> None:
        log.warning("%s: not prepared (%s); the plain queryset serves it", self.build, why)


class PreparedQuery(_Prepared, Generic[M]):
    """``build(**values)``'s first row, with the SQL compiled once per database.

    ``examples`` gives each value an example of its type that no constant of the query could
    equal (a very large id, say): the query is compiled with them, and again with each changed
    in turn, to find where each goes among the parameters. ``build`` must return a queryset of
    model instances (``select_related``, ``defer`` and ``annotate`` are fine; ``values()``,
    ``prefetch_related`` and extra selects are not).
    """

    build: Callable[..., models.QuerySet[M]]

    def __init__(self, build: Callable[..., models.QuerySet[M]], **examples: Any) -> None:
        super().__init__(build, **examples)

    def first(self, using: str = "default", **values: Any) -> M | None:
        prepared = self._prepared(using, values)
        if prepared is None:  # cannot be prepared: the plain queryset
            return next(iter(self.build(**values).using(using)[:1]), None)
        compiled, params = prepared
        connection = connections[using]
        with connection.cursor() as cursor:
            cursor.execute(compiled.sql, params)
            rows = cursor.fetchmany(1)
        return next(self._models(compiled.compiler, connection, using, rows), None)

    def _sql(self, using: str, values: Mapping[str, Any]) -> tuple[tuple[str, list[Any]], Any]:
        queryset = self.build(**values)[:1]
        compiler = queryset.query.get_compiler(using=using)
        sql, params = compiler.as_sql()
        return (sql, list(params)), compiler

    @staticmethod
    def _models(compiler: Any, connection: Any, using: str, rows: list[Any]) -> Any:
        """The rows as model instances, as ``ModelIterable`` makes them."""
        compiler = copy.copy(compiler)
        compiler.connection = connection  # this thread's, for the converters
        select, klass_info = compiler.select, compiler.klass_info
        annotations = compiler.annotation_col_map
        model = klass_info["model"]
        start, end = klass_info["select_fields"][0], klass_info["select_fields"][-1] + 1
        names = [column[0].target.attname for column in select[start:end]]
        # Django 5.2's signature; the stubs follow a later Django's (fetch_mode added).
        related = get_related_populators(klass_info, select, using)  # type: ignore[call-arg]
        for row in compiler.results_iter([rows]):
            instance = model.from_db(using, names, row[start:end])
            for populator in related:
                populator.populate(row, instance)
            for name, position in (annotations or {}).items():
                setattr(instance, name, row[position])
            yield instance


class PreparedUpdate(_Prepared):
    """``queryset.update(**fields)`` for ``build(**values)``'s ``(queryset, fields)``, with the
    SQL compiled once per database; the number of rows it changed, as ``update`` returns.

    As :class:`PreparedQuery` (``examples``, and the fallback to the plain ``update`` when
    it cannot tell where a value goes). The queryset must filter its model's own rows: a
    filter across a relation makes Django rewrite the update (``pk IN`` a subquery) and is
    refused, as is an update of a parent model's fields."""

    def __init__(
        self,
        build: Callable[..., tuple[models.QuerySet[Any], Mapping[str, Any]]],
        **examples: Any,
    ) -> None:
        super().__init__(build, **examples)

    def update(self, using: str = "default", **values: Any) -> int:
        prepared = self._prepared(using, values)
        if prepared is None:
            queryset, fields = self.build(**values)
            return int(queryset.using(using).update(**fields))
        compiled, params = prepared
        with transaction.mark_for_rollback_on_error(using), connections[using].cursor() as cursor:
            cursor.execute(compiled.sql, params)
            return int(cursor.rowcount)

    def _sql(self, using: str, values: Mapping[str, Any]) -> tuple[tuple[str, list[Any]], Any]:
        queryset, fields = self.build(**values)
        query = queryset.query.chain(sql.UpdateQuery)
        query.add_update_values(fields)
        query.annotations = {}
        compiler = query.get_compiler(using=using)
        # What SQLUpdateCompiler.pre_sql_setup rewrites (into ``pk IN`` a subquery, or an
        # update per parent table) is not prepared.
        query.get_initial_alias()
        if query.related_updates or query.count_active_tables() > 1:
            raise _NotPreparable("it reaches across a relation")
        statement, params = compiler.as_sql()
        return (statement, list(params)), compiler
