"""The scenarios' rows: storing what was dreamed (accepted, rejected with its reason, probes),
the never-repeat lookups of one run (exact content hash), reading scenarios back (a stopped
cycle, the report's examples and rejections), and the near-duplicate signatures
(dreamd/dream/neardup.py). Store (store/record.py) inherits these; like every store call, each
is one short transaction, retried on transient failures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import bindparam, delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from dreamd.dream.scenario import Scenario
from dreamd.store.db import Database, retry_transient
from dreamd.store.tables import (
    SCENARIO_STATUSES,
    Cycle,
    MinhashSignature,
    ScenarioRow,
    StepExample,
    TrainStep,
)


class SavedScenario(NamedTuple):
    id: int
    duplicate_of: int | None
    """Set when the content was already in the store: the row was stored as a rejected
    duplicate (or, for a probe, as a probe pointing at the earlier copy)."""


def check_value(value: str, allowed: tuple[str, ...], what: str) -> None:
    """A status or kind outside its CHECK constraint, said before the database does."""
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(allowed)}")


@retry_transient
class ScenarioRecords(Database):
    """Scenario rows, one run's never-repeat lookups and the near-duplicate signatures."""

    # ---- scenarios ---------------------------------------------------------------------------
    def hash_exists(self, run_id: int, content_hash: str) -> int | None:
        """The id of the run's scenario holding this content hash, or None (another run's
        copy does not count: docs/sql.md, "Several runs in one store")."""
        with self.read() as s:
            return s.scalar(select(ScenarioRow.id).where(ScenarioRow.run_id == run_id,
                                                         ScenarioRow.content_hash == content_hash))

    def scenario_status(self, run_id: int, content_hash: str) -> str | None:
        """The status of the run's scenario holding this content hash, or None."""
        with self.read() as s:
            return s.scalar(select(ScenarioRow.status).where(ScenarioRow.run_id == run_id,
                                                             ScenarioRow.content_hash == content_hash))

    def probe_scenarios(self, run_id: int) -> list[tuple[int, Scenario]]:
        """The run's probe rows (status 'probe'), in the order they were stored, as (id, the
        scenario with its meta, the probe record under meta['probe'] included)."""
        with self.read() as s:
            rows = s.execute(select(ScenarioRow).where(ScenarioRow.run_id == run_id, ScenarioRow.status == "probe")
                             .order_by(ScenarioRow.id)).scalars().all()
            return [(row.id, Scenario(kind=row.kind, source=row.source, messages=list(row.messages_json),
                                           target=row.target, spec=row.spec, meta=dict(row.meta_json or {})))
                    for row in rows]

    def trained_scenarios(self, run_id: int, cycle_id: int | None = None) -> list[tuple[int, Any, str, Any]]:
        """(id, messages, target, meta) of every scenario a step of `cycle_id` trained on (of the
        whole run when None), each once."""
        query = (select(ScenarioRow.id, ScenarioRow.messages_json, ScenarioRow.target, ScenarioRow.meta_json)
                 .join(StepExample, StepExample.scenario_id == ScenarioRow.id)
                 .join(TrainStep, TrainStep.id == StepExample.step_id)
                 .where(TrainStep.run_id == run_id).distinct())
        if cycle_id is not None:
            query = query.where(TrainStep.cycle_id == cycle_id)
        with self.read() as s:
            return [tuple(row) for row in s.execute(query)]

    def add_scenario(self, run_id: int, cycle_id: int | None, scenario: Scenario,
                     status: str, reject_reason: str | None = None,
                     temperature: float | None = None) -> SavedScenario:
        """Store a scenario with the screen's verdict ('accepted', 'rejected' with a reason, or
        'probe' for fixed eval items, cycle_id None).

        Exact-duplicate rule: content_hash is unique within the run. If the run already stored
        the content, the new row gets content_hash NULL and duplicate_of = the earlier id, and
        (unless it is a probe) status 'rejected' with reject_reason 'duplicate: ...'. Check
        `.duplicate_of` of the result: not None means "do not train on it".
        """
        check_value(status, SCENARIO_STATUSES, "scenario status")
        if (status == "rejected") != (reject_reason is not None):
            raise ValueError("a rejected scenario needs a reject_reason, and only a rejected one")
        digest = scenario.content_hash
        for attempt in (0, 1):
            try:
                with self.session() as s:
                    return self._insert_scenario(s, run_id, cycle_id, scenario, status, reject_reason, temperature)
            except IntegrityError:
                # PostgreSQL: another writer stored the same hash between our check and insert
                # (SQLite cannot race: BEGIN IMMEDIATE serialises writers). Retry once; the
                # second pass sees the original and stores a duplicate.
                if attempt == 1 or self.hash_exists(run_id, digest) is None:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _insert_scenario(s: Any, run_id: int, cycle_id: int | None, scenario: Scenario, status: str,
                         reject_reason: str | None = None, temperature: float | None = None) -> SavedScenario:
        """One scenarios row inside the session `s`, by add_scenario's duplicate rule."""
        digest = scenario.content_hash
        original = s.scalar(select(ScenarioRow.id).where(ScenarioRow.run_id == run_id,
                                                         ScenarioRow.content_hash == digest))
        row = ScenarioRow(run_id=run_id, cycle_id=cycle_id, kind=str(scenario.kind),
                          source=scenario.source, content_hash=digest,
                          messages_json=scenario.messages, target=scenario.target,
                          spec=scenario.spec, status=status, reject_reason=reject_reason,
                          meta_json=scenario.meta, temperature=temperature)
        if original is not None:
            row.content_hash, row.duplicate_of = None, original
            if status != "probe":
                also = f" (also: {reject_reason})" if reject_reason else ""
                row.status = "rejected"
                row.reject_reason = f"duplicate: exact copy of scenario {original}{also}"
        s.add(row)
        s.flush()
        return SavedScenario(row.id, row.duplicate_of)

    def add_probe_set(self, run_id: int, scenarios: Sequence[Scenario]) -> list[int]:
        """A run's whole probe set in ONE transaction (status 'probe', cycle_id NULL), ids in
        order: a crash while storing leaves no probes rather than some (a partial set would be
        read back as the run's probes on every restart)."""
        with self.session() as s:
            return [self._insert_scenario(s, run_id, None, sc, "probe").id for sc in scenarios]

    def add_scenarios(self, run_id: int, cycle_id: int | None, scenarios: Sequence[Scenario],
                      status: str) -> list[int]:
        """Many scenarios with one verdict in ONE transaction and one insert statement (a bulk
        load: 1e6 rows in minutes, where add_probe_set's row-by-row flush takes ~1 ms a row), ids
        in order, by add_scenario's duplicate rule: a copy of the run's stored scenario, or of an earlier
        one in `scenarios`, gets content_hash NULL and duplicate_of (and, unless a probe, status
        'rejected' with the reason)."""
        check_value(status, SCENARIO_STATUSES, "scenario status")
        if status == "rejected":
            raise ValueError("a rejected scenario needs its reason: store it with add_scenario")
        if not scenarios:
            return []
        hashes = [sc.content_hash for sc in scenarios]
        with self.session() as s:
            original = dict(row for i in range(0, len(hashes), 500) for row in s.execute(
                select(ScenarioRow.content_hash, ScenarioRow.id)
                .where(ScenarioRow.run_id == run_id, ScenarioRow.content_hash.in_(hashes[i:i + 500]))))
            first: dict[str, int] = {}  # hash -> position of its first copy in this call
            rows = []
            for pos, (sc, h) in enumerate(zip(scenarios, hashes)):
                copy = h in original or h in first
                first.setdefault(h, pos)
                rows.append({"run_id": run_id, "cycle_id": cycle_id, "kind": str(sc.kind), "source": sc.source,
                             "content_hash": None if copy else h, "messages_json": sc.messages,
                             "target": sc.target, "spec": sc.spec, "status": status, "meta_json": sc.meta,
                             "duplicate_of": original.get(h)})
            table = ScenarioRow.__table__  # Core: one multi-row INSERT ... RETURNING per ~1000 rows
            ids = s.scalars(insert(table).returning(table.c.id, sort_by_parameter_order=True), rows).all()
            copies = []
            for pos, (row, h) in enumerate(zip(rows, hashes)):
                if row["content_hash"] is None:
                    of = row["duplicate_of"] or ids[first[h]]
                    copies.append({"b_id": ids[pos], "of": of, "st": "probe" if status == "probe" else "rejected",
                                   "why": None if status == "probe" else f"duplicate: exact copy of scenario {of}"})
            if copies:
                s.execute(update(table).where(table.c.id == bindparam("b_id"))
                          .values(duplicate_of=bindparam("of"), status=bindparam("st"),
                                  reject_reason=bindparam("why")), copies)
            return list(ids)

    def drop_probe_set(self, run_id: int) -> int:
        """Delete a run's probe rows (an incomplete set a crash left before probe sets were
        written atomically; nothing references them: no step trains a probe and no eval is
        written before the set is complete). Returns the number deleted."""
        with self.session() as s:
            return s.execute(delete(ScenarioRow).where(ScenarioRow.run_id == run_id,
                                                       ScenarioRow.status == "probe")).rowcount

    # ---- reading scenarios back -------------------------------------------------------------
    def load_scenarios(self, ids: Sequence[int]) -> dict[int, Scenario]:
        """Stored scenarios by id, as the dreamer made them (to re-encode a stopped cycle)."""
        with self.read() as s:
            rows = s.scalars(select(ScenarioRow).where(ScenarioRow.id.in_(list(ids)))).all()
        found = {r.id: Scenario(kind=r.kind, source=r.source, messages=r.messages_json,
                                     target=r.target, spec=r.spec, meta=r.meta_json or {})
                 for r in rows}
        missing = sorted(set(ids) - set(found))
        if missing:
            raise ValueError(f"scenarios {missing[:5]} are not in the store")
        return found

    def rejections(self, run_id: int) -> list[dict[str, Any]]:
        """The dream_rejections view summed over a run's cycle attempts: rule, kind, source, n and
        one full reason as example; the most frequent first."""
        query = text("SELECT rule, kind, source, SUM(n) AS n, MIN(example) AS example FROM dream_rejections "
                     "WHERE run_id = :run_id GROUP BY rule, kind, source ORDER BY SUM(n) DESC, rule, kind, source")
        with self.read() as s:
            return [dict(r) for r in s.execute(query, {"run_id": run_id}).mappings()]

    def scenario_examples(self, run_id: int, status: str, *, kind: str | None = None,
                          rule: str | None = None, limit: int = 2) -> list[dict[str, Any]]:
        """The newest `limit` scenarios of a run with `status` ('accepted', 'rejected'), of one
        kind and/or one rejection rule (the reason's text before its first colon), with their
        cycle's number: id, cycle, kind, source, status, reject_reason, messages, target, meta."""
        check_value(status, SCENARIO_STATUSES, "scenario status")
        query = (select(ScenarioRow, Cycle.number).outerjoin(Cycle, Cycle.id == ScenarioRow.cycle_id)
                 .where(ScenarioRow.run_id == run_id, ScenarioRow.status == status)
                 .order_by(ScenarioRow.id.desc()).limit(limit))
        if kind is not None:
            query = query.where(ScenarioRow.kind == kind)
        if rule is not None:
            query = query.where(ScenarioRow.reject_reason.like(f"{rule}:%"))
        with self.read() as s:
            return [{"id": r.id, "cycle": number, "kind": r.kind, "source": r.source, "status": r.status,
                     "reject_reason": r.reject_reason, "messages": r.messages_json, "target": r.target,
                     "meta": r.meta_json}
                    for r, number in s.execute(query)]

    # ---- near duplicates (dreamd/dream/neardup.py) -------------------------------------------
    def add_minhashes(self, scheme: str, rows: Sequence[tuple[int, bytes]]) -> list[int]:
        """Index accepted scenarios for the near-duplicate check, in one transaction: per row
        (scenario id, signature bytes; empty for a scenario without words). A scenario already
        indexed under `scheme` is left as it is; one indexed under another scheme is replaced.
        Returns the ids stored now."""
        if not rows:
            return []
        ids = [r[0] for r in rows]
        with self.session() as s:
            have = {r[0]: r[1] for r in s.execute(select(MinhashSignature.scenario_id, MinhashSignature.scheme)
                                                  .where(MinhashSignature.scenario_id.in_(ids)))}
            stale = [sid for sid, old in have.items() if old != scheme]
            if stale:
                s.execute(delete(MinhashSignature).where(MinhashSignature.scenario_id.in_(stale)))
            new = {sid: sig for sid, sig in rows if have.get(sid) != scheme}
            if new:
                s.execute(insert(MinhashSignature),
                          [{"scenario_id": sid, "scheme": scheme, "signature": sig} for sid, sig in new.items()])
            return list(new)

    def minhash_page(self, scheme: str, after_id: int, limit: int,
                     run_id: int | None = None) -> list[tuple[int, bytes]]:
        """(scenario id, signature) of `scheme` with id > after_id, by id, at most `limit`
        (the near-duplicate index reads the whole table this way when it opens); with a run
        id, only that run's scenarios (docs/sql.md "Several runs in one store")."""
        query = (select(MinhashSignature.scenario_id, MinhashSignature.signature)
                 .where(MinhashSignature.scenario_id > after_id, MinhashSignature.scheme == scheme))
        if run_id is not None:
            query = query.join(ScenarioRow, ScenarioRow.id == MinhashSignature.scenario_id) \
                .where(ScenarioRow.run_id == run_id)
        with self.read() as s:
            return [(r[0], bytes(r[1])) for r in s.execute(
                query.order_by(MinhashSignature.scenario_id).limit(limit))]

    def accepted_without_minhash(self, scheme: str, limit: int = 500,
                                 run_id: int | None = None) -> dict[int, Scenario]:
        """Accepted scenarios not yet indexed under `scheme` (oldest first), at most `limit`;
        with a run id, only that run's."""
        indexed = select(MinhashSignature.scenario_id).where(MinhashSignature.scheme == scheme)
        query = select(ScenarioRow.id).where(ScenarioRow.status == "accepted", ScenarioRow.id.not_in(indexed))
        if run_id is not None:
            query = query.where(ScenarioRow.run_id == run_id)
        with self.read() as s:
            ids = list(s.scalars(query.order_by(ScenarioRow.id).limit(limit)))
        return self.load_scenarios(ids) if ids else {}
