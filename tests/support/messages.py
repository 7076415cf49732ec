"""Hypothesis strategies for the typed wire messages, derived from their field codecs, and
the contract's schema for each operation's bodies.

``messages(cls)`` draws valid instances of a message type from its declaration alone, so
a new message needs no new strategy. ``messages(cls, schema=...)`` also keeps each field
within what the contract's schema for it says (for requests: their types check shapes and
leave domain bounds to the route's own rule and reason code, so a type may take more than
the contract documents; a well-behaved client sends what the contract says).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from populi_peer.core.election import (
    Heartbeat,
    HeartbeatAck,
    PreVoteAnswer,
    PreVoteRequest,
    VoteAnswer,
    VoteRequest,
)
from populi_peer.core.fencing import FencingToken
from populi_peer.core.hlc import Hlc
from populi_peer.core.leases import Lease
from populi_peer.core.lifecycle import STATES, NodeLifecycle
from populi_peer.core.messages import OPERATIONS, Message
from populi_peer.core.messages import _codec as c
from populi_peer.core.messages.election import ELECTION_MESSAGE
from populi_peer.core.messages.heartbeat import INCARNATION, REPORT, REPORT_ANSWER, GpuSection
from populi_peer.core.messages.inbox import (
    ANSWERS,
    PAYLOADS,
    InboxDeliverAnswer,
    TaggedAnswer,
    TaggedPayload,
)
from populi_peer.core.messages.records import (
    ATTEMPT,
    LEASE,
    LIFECYCLE,
    REASON_ENTRY,
    REGISTER_WRITE,
    TASK_OPTIONS,
    TOKEN,
    EnvNames,
    SettingsValuesCodec,
    WorkClassCodec,
)
from populi_peer.core.policy import WORK_CLASSES
from populi_peer.core.registers import RegisterWrite, Stamp
from populi_peer.core.replication import Digest, Entry, SetElement, WriteId
from populi_peer.core.reports import (
    Claim,
    FullReport,
    Incarnation,
    NodeHoldings,
    RefusedLease,
    ReportAnswer,
    ReportChange,
    ReportChanges,
    ReportedLease,
)
from populi_peer.core.settings import SCOPES, SETTINGS
from populi_peer.core.settings import WORK_CLASSES as GATE_CLASSES
from populi_peer.core.tasks import ATTEMPT_OUTCOMES, Attempt, ReasonEntry, TaskOptions
from populi_peer.errors import PopuliError
from support.contract import document
from support.fuzz import json_trees
from support.reports import sample_lease

Schema = Mapping[str, Any]
HTTP_METHODS = ("get", "put", "post", "delete", "patch")

# -- the contract -------------------------------------------------------------------------


def resolve(schema: Any) -> Any:
    while isinstance(schema, Mapping) and "$ref" in schema:
        node: Any = document()
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def operations() -> dict[str, tuple[str, str, dict[str, Any]]]:
    """operationId -> (METHOD, path, operation)."""
    found = {}
    for path, item in document()["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                found[item[method]["operationId"]] = (method.upper(), path, item[method])
    return found


def answer_schema(operation_id: str) -> Schema:
    _, _, operation = operations()[operation_id]
    return resolve(operation["responses"]["200"]["content"]["application/json"]["schema"])


def request_schema(operation_id: str) -> Schema | None:
    """The request body's schema; None where the operation takes none or ignores it."""
    _, _, operation = operations()[operation_id]
    body = operation.get("requestBody")
    if body is None or body.get("$ref") == "#/components/requestBodies/Ignored":
        return None
    return resolve(resolve(body)["content"]["application/json"]["schema"])


def validator(schema: Schema) -> Draft202012Validator:
    """A validator of ``schema`` whose ``#/components/...`` references resolve in the
    contract."""
    return Draft202012Validator({"components": document()["components"], "allOf": [schema]})


def properties(schema: Any) -> dict[str, Any]:
    """Every property a body of ``schema`` may carry, through ``$ref``, ``allOf``,
    ``oneOf`` and ``anyOf`` (the subschemas of one name are kept in a list)."""
    schema = resolve(schema)
    found: dict[str, Any] = {}
    if not isinstance(schema, Mapping):
        return found
    for name, sub in schema.get("properties", {}).items():
        found.setdefault(name, []).append(sub)
    for key in ("allOf", "oneOf", "anyOf"):
        for part in schema.get(key, []):
            for name, subs in properties(part).items():
                found.setdefault(name, []).extend(subs)
    return found


# -- what a message writes ----------------------------------------------------------------

_SAMPLE_LEASE = sample_lease(revoked_by="op")


def keys(cls: type[Message]) -> set[str]:
    """Every key a body of ``cls`` may carry (flattened records included)."""
    if cls is InboxDeliverAnswer:
        return {"message_id", "type", "duplicate", "result"}
    out: set[str] = set()
    for field in fields(cls):
        codec = field.metadata["codec"]
        if not field.metadata["flatten"]:
            out.add(field.name)
        elif isinstance(codec, c.Nested):
            out |= keys(codec.cls)
        elif codec is LEASE:
            out |= set(_SAMPLE_LEASE.to_json())
        elif isinstance(codec, TaggedPayload):
            out.add("type")
            for payload in PAYLOADS.values():
                out |= keys(payload)
        else:  # pragma: no cover - a new kind of flattened field
            raise AssertionError(f"{cls.__name__}.{field.name}: unknown flattened codec")
    return out


# -- strategies ---------------------------------------------------------------------------

_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
ID_RE = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}"
ids = st.from_regex(ID_RE, fullmatch=True)
ms = st.integers(0, 2**45)


def _text(codec: c.Text) -> st.SearchStrategy[str]:
    if codec.pattern is not None:
        made = st.from_regex(codec.pattern, fullmatch=True)
    else:
        alphabet = (
            _TEXT
            if not codec.one_line
            else st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n")
        )
        made = st.text(alphabet, min_size=codec.min_len, max_size=min(codec.max_len or 24, 24))
    return made.filter(lambda s: codec.min_len <= len(s) <= (codec.max_len or len(s)))


tokens = st.builds(FencingToken, st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1))


@st.composite
def lifecycles(draw: st.DrawFn) -> NodeLifecycle:
    state = draw(st.sampled_from(STATES))
    return NodeLifecycle(
        state,
        draw(ms),
        draw(ids),
        draw(st.text(max_size=10)),
        deadline_wall_ms=draw(st.none() | ms) if state == "draining" else None,
        until_wall_ms=draw(st.none() | ms) if state == "maintenance" else None,
    )


@st.composite
def register_writes(draw: st.DrawFn) -> RegisterWrite:
    node = draw(ids)
    uuid = draw(ids)
    writer_class = draw(st.sampled_from(("self", "operator", "leader")))
    quarantined = True if writer_class == "self" else draw(st.booleans())
    return RegisterWrite(
        node_id=node,
        attribute=f"gpu_quarantine/{uuid}",
        value={"quarantined": quarantined, "reason": draw(st.text(max_size=8))},
        stamp=Stamp(
            draw(st.integers(0, 9)),
            Hlc(draw(ms), draw(st.integers(0, 9))),
            node if writer_class == "self" else draw(ids),
        ),
        writer_class=writer_class,
        actor=draw(ids),
        reason=draw(st.text(max_size=8)),
        at_wall_ms=draw(ms),
    )


@st.composite
def leases(draw: st.DrawFn) -> Lease:
    kind = draw(st.sampled_from(("remote", "local", "fence")))
    submitter = draw(ids)
    holder = draw(ids.filter(lambda h: h != submitter)) if kind == "remote" else submitter
    state = draw(
        st.sampled_from(("live", "revoking", "completed", "released", "revoked", "expired"))
    )
    return Lease(
        lease_id=draw(ids),
        task_id=draw(ids),
        attempt=draw(st.integers(1, 99)),
        work_class=draw(st.sampled_from(WORK_CLASSES)),
        holder=holder,
        submitter=submitter,
        gpus=() if kind == "fence" else tuple(draw(st.lists(ids, max_size=3, unique=True))),
        token=draw(tokens),
        ttl_s=0.0 if kind == "fence" else draw(st.floats(3, 3600)),
        state=state,
        kind=kind,
        granted_wall_ms=draw(ms),
        state_changed_wall_ms=draw(ms),
        reason=draw(st.text(max_size=8)),
        revoked_by=draw(st.none() | ids),
    )


@st.composite
def attempts(draw: st.DrawFn) -> Attempt:
    where = draw(st.sampled_from(("remote", "local")))
    finished = draw(st.booleans())
    return Attempt(
        n=draw(st.integers(1, 9)),
        where=where,
        node=draw(ids),
        lease_id=draw(ids) if where == "remote" else draw(st.none() | ids),
        token=draw(tokens) if where == "remote" else draw(st.none() | tokens),
        placement_reasons=tuple(draw(st.lists(ids, max_size=2))),
        started_wall_ms=draw(ms),
        finished_wall_ms=draw(ms) if finished else None,
        outcome=draw(st.sampled_from(ATTEMPT_OUTCOMES)) if finished else None,
    )


reason_entries = st.builds(ReasonEntry, ms, ids, st.text(max_size=8))
task_options = st.builds(
    TaskOptions,
    no_fallback=st.booleans(),
    queue_timeout_s=st.none() | st.floats(0.001, 1e6),
    timeout_s=st.none() | st.floats(0.001, 1e6),
    node=st.none() | ids,
)

incarnations = st.builds(
    Incarnation, st.integers(0, 2**31), st.sampled_from(["a1b2c3d4e5f60718", "0011223344556677"])
)
reported_leases = st.builds(
    ReportedLease,
    lease_id=st.sampled_from(["l-1", "l-2"]),
    task_id=st.sampled_from(["t-1", "t-2"]),
    attempt=st.integers(1, 5),
    work_class=st.sampled_from(WORK_CLASSES),
    submitter=st.sampled_from(["n-sub", "n-w1"]),
    gpus=st.sampled_from([(), ("GPU-0",), ("GPU-0", "GPU-1")]),
    token=tokens,
    ttl_s=st.floats(1, 600),
    kind=st.sampled_from(["remote", "local"]),
    phase=st.sampled_from(["accepted", "started"]),
    granted_wall_ms=st.none() | st.integers(0, 2**41),
)
claims = st.builds(
    Claim,
    claim_id=st.sampled_from(["c-1", "c-2"]),
    node=st.just("n-w1"),
    task_id=st.sampled_from(["t-1", "t-2"]),
    attempt=st.integers(1, 5),
    token=tokens,
    gpus=st.sampled_from([("GPU-0",), ("GPU-0", "GPU-1")]),
    made_wall_ms=st.integers(0, 2**41),
)
full_reports = st.builds(
    FullReport,
    node=st.just("n-w1"),
    incarnation=incarnations,
    epoch=st.integers(1, 100),
    seq=st.integers(1, 100),
    holdings=st.builds(
        NodeHoldings,
        leases=st.lists(reported_leases, max_size=2, unique_by=lambda x: x.lease_id).map(tuple),
        claims=st.lists(claims, max_size=1).map(tuple),
    ),
)
report_changes = st.builds(
    ReportChanges,
    node=st.just("n-w1"),
    incarnation=incarnations,
    epoch=st.integers(1, 100),
    base_seq=st.integers(1, 50),
    changes=st.lists(
        st.builds(ReportChange, seq=st.integers(51, 60), dropped_leases=st.just(("l-9",))),
        max_size=1,
    ).map(tuple),
)
report_answers = st.builds(
    ReportAnswer,
    incarnation=incarnations,
    status=st.sampled_from(["applied", "duplicate", "full_report_needed", "wrong_incarnation"]),
    epoch=st.integers(0, 100),
    acked_seq=st.integers(0, 100),
    refused=st.lists(
        st.builds(RefusedLease, st.just("l-1"), st.just("lease_mismatch")), max_size=1
    ).map(tuple),
)

_voters = st.sampled_from(["n-v1", "n-v2", "n-v3"])
_terms = st.integers(0, 50)
_digests = st.lists(st.builds(WriteId, st.integers(0, 5), st.integers(1, 9)), max_size=4).map(
    Digest
)
_election_entries = st.lists(
    st.builds(
        Entry,
        st.builds(WriteId, st.integers(0, 5), st.integers(1, 9)),
        st.builds(
            SetElement,
            st.just("revoked_nodes"),
            st.sampled_from(["n-a", "n-b"]),
            st.just({"reason": "lost"}),
            st.builds(Stamp, _terms, st.builds(Hlc, st.integers(1, 9), st.just(0)), _voters),
        ),
    ),
    max_size=2,
).map(tuple)
_holds = st.integers(0, 3_600_000).map(lambda ms: ms / 1000)
election_messages = st.one_of(
    st.builds(PreVoteRequest, _voters, _terms),
    st.builds(PreVoteAnswer, _voters, _terms, st.booleans(), _terms),
    st.builds(VoteRequest, _voters, _terms, _digests, _holds),
    st.builds(VoteAnswer, _voters, _terms, st.booleans(), _election_entries, _digests),
    st.builds(Heartbeat, _voters, _terms, st.integers(0, 99), _digests, _election_entries, _holds),
    st.builds(HeartbeatAck, _voters, _terms, st.integers(0, 99), st.booleans(), _digests),
)

CORE: dict[int, st.SearchStrategy[Any]] = {
    id(ELECTION_MESSAGE): election_messages,
    id(INCARNATION): incarnations,
    id(REPORT): full_reports | report_changes,
    id(REPORT_ANSWER): report_answers,
    id(TOKEN): tokens,
    id(LIFECYCLE): lifecycles(),
    id(REGISTER_WRITE): register_writes(),
    id(LEASE): leases(),
    id(ATTEMPT): attempts(),
    id(REASON_ENTRY): reason_entries,
    id(TASK_OPTIONS): task_options,
}

json_leaves = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
json_values = json_trees(json_leaves, width=3, key_size=6, max_leaves=8)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
env_names = st.text(string.ascii_uppercase + "_", min_size=1, max_size=8).filter(
    lambda n: not n.startswith("POPULI_") and n != "CUDA_VISIBLE_DEVICES"
)
envs = st.dictionaries(env_names, st.text(_TEXT, max_size=8), max_size=4)
commands = st.lists(st.text(_TEXT, max_size=8), min_size=1, max_size=4).filter(lambda a: a[0] != "")

gpu_devices = st.fixed_dictionaries(
    {"index": st.integers(0, 7)},
    optional={
        "uuid": ids,
        "health_reasons": st.lists(st.text(max_size=6), max_size=2),
        "name": st.text(max_size=6),
    },
)
gpu_sections = st.fixed_dictionaries(
    {}, optional={"devices": st.lists(gpu_devices, max_size=3), "backend": st.text(max_size=5)}
)


def _setting_value(key: str) -> st.SearchStrategy[Any]:
    spec = next(s for s in SETTINGS if s.key == key)
    if spec.kind == "bool":
        return st.booleans()
    if spec.kind == "float":
        return st.floats(spec.minimum, spec.maximum)
    gates = [f"{w}:{s}" for w in GATE_CLASSES for s in SCOPES]
    return st.lists(st.sampled_from(gates), max_size=3, unique=True).map(sorted)


def _settings(codec: SettingsValuesCodec) -> st.SearchStrategy[Mapping[str, Any]]:
    every = {spec.key: _setting_value(spec.key) for spec in SETTINGS}
    if codec.complete:
        return st.fixed_dictionaries(every)
    return st.fixed_dictionaries({}, optional=every).filter(bool)


#: Fields whose values must also pass a rule across them (argv, environment names).
FIELDS: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("HandoffMessage", "command"): commands.map(tuple),
    ("HandoffMessage", "env"): envs,
    ("TaskSubmitRequest", "command"): commands.map(tuple),
    ("TaskSubmitRequest", "env"): envs,
}


def _within(schema: Any) -> Callable[[Any], bool]:
    if not schema:
        return lambda value: True
    return validator(schema).is_valid


def _narrow_number(
    codec: c.Int | c.Num, schemas: list[Any]
) -> tuple[float | None, float | None, bool]:
    low = codec.above if isinstance(codec, c.Num) and codec.above is not None else codec.minimum
    exclusive = isinstance(codec, c.Num) and codec.above is not None
    high = codec.maximum
    for part in schemas:
        schema = resolve(part)
        if "maximum" in schema:
            high = schema["maximum"] if high is None else min(high, schema["maximum"])
        if "minimum" in schema and (low is None or schema["minimum"] > low):
            low, exclusive = schema["minimum"], False
        if "exclusiveMinimum" in schema and (low is None or schema["exclusiveMinimum"] >= low):
            low, exclusive = schema["exclusiveMinimum"], True
    return low, high, exclusive


def values(codec: c.Codec[Any], schemas: list[Any] | None = None) -> st.SearchStrategy[Any]:
    """What ``codec`` takes (as the message holds it), and, with ``schemas`` (the
    contract's subschemas for the field), only what they allow too."""
    schemas = [resolve(s) for s in schemas or []]
    if id(codec) in CORE:
        made = CORE[id(codec)]
    elif isinstance(codec, c.Nullable):
        return st.none() | values(codec.inner, schemas)
    elif isinstance(codec, c.Int):
        low, high, _ = _narrow_number(codec, schemas)
        made = st.integers(
            int(low) if low is not None else -(2**53), int(high) if high is not None else 2**53
        )
    elif isinstance(codec, c.Num):
        low, high, exclusive = _narrow_number(codec, schemas)
        made = st.floats(
            low if low is not None else -1e9,
            high if high is not None else 1e9,
            exclude_min=exclusive,
            allow_nan=False,
        )
    elif isinstance(codec, c.Bool):
        made = st.booleans()
    elif isinstance(codec, c.Text):
        pattern = next((s["pattern"] for s in schemas if "pattern" in s), None)
        made = (
            st.from_regex(pattern, fullmatch=True).filter(_ok(codec))
            if pattern is not None and codec.pattern is None
            else _text(codec)
        )
    elif isinstance(codec, c.Ident):
        made = ids
    elif isinstance(codec, c.Choice):
        made = st.sampled_from(codec.choices)
    elif isinstance(codec, c.Const):
        made = st.just(codec.value)
    elif isinstance(codec, c.Seq):
        items = [s.get("items") for s in schemas if s.get("items")]
        high = min([s["maxItems"] for s in schemas if "maxItems" in s] + [codec.max_items or 3, 3])
        low = max([s.get("minItems", 0) for s in schemas] + [codec.min_items])
        unique = any(s.get("uniqueItems") for s in schemas)
        made = st.lists(
            values(codec.item, items), min_size=low, max_size=max(low, high), unique=unique
        ).map(tuple)
    elif isinstance(codec, c.Dict):
        made = st.dictionaries(st.text(max_size=4), values(codec.value), max_size=2)
    elif isinstance(codec, GpuSection):
        made = gpu_sections
    elif isinstance(codec, c.JsonObject):
        made = json_objects
    elif isinstance(codec, c.Nested):
        made = messages(codec.cls, schema=schemas[0] if schemas else None)
    elif isinstance(codec, WorkClassCodec):
        made = st.sampled_from(WORK_CLASSES)
    elif isinstance(codec, SettingsValuesCodec):
        made = _settings(codec)
    elif isinstance(codec, EnvNames):
        made = st.lists(env_names, max_size=3, unique=True).map(lambda names: tuple(sorted(names)))
    elif isinstance(codec, TaggedPayload):
        made = st.one_of(
            [messages(cls, schema=schemas[0] if schemas else None) for cls in PAYLOADS.values()]
        )
    else:  # pragma: no cover - a new codec: teach it here
        raise AssertionError(f"no strategy for {type(codec).__name__}")
    if schemas and not isinstance(codec, (c.Nested, TaggedPayload)):
        made = made.filter(lambda v: all(_within(s)(codec.dump(v)) for s in schemas))
    return made


def _ok(codec: c.Codec[Any]) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        try:
            codec.parse(value, "x")
        except PopuliError:
            return False
        return True

    return check


def messages(cls: type[Message], *, schema: Any = None) -> st.SearchStrategy[Any]:
    """Valid instances of ``cls``; within ``schema`` where given."""
    if cls is InboxDeliverAnswer:
        return _deliver_answers()
    props = properties(schema) if schema is not None else {}
    draws: dict[str, st.SearchStrategy[Any]] = {}
    for field in fields(cls):
        codec = field.metadata["codec"]
        override = FIELDS.get((cls.__name__, field.name))
        flat = field.metadata["flatten"]
        if override is not None:
            made = override
        elif flat:  # the enclosing schema describes the flattened record and more
            made = values(
                codec, [schema] if schema is not None and isinstance(codec, c.Nested) else None
            )
        else:
            made = values(codec, props.get(field.name))
        if field.metadata["omit_none"]:
            made = st.none() | made
        elif field.default is not c._MISSING and not flat:
            made = st.just(field.default) | made
        draws[field.name] = made
    return (
        st.fixed_dictionaries(draws).map(lambda kw: _build(cls, kw)).filter(lambda m: m is not None)
    )


def _build(cls: type[Message], kwargs: dict[str, Any]) -> Message | None:
    try:
        return cls(**kwargs)
    except PopuliError:  # a rule across fields (both a relative and an absolute deadline...)
        return None


@st.composite
def _deliver_answers(draw: st.DrawFn) -> InboxDeliverAnswer:
    kind = draw(st.sampled_from(sorted(ANSWERS)))
    return InboxDeliverAnswer(
        message_id=draw(st.text(max_size=8)),
        type=kind,
        duplicate=draw(st.booleans()),
        result=draw(messages(ANSWERS[kind])),
    )


def every_message_type() -> list[type[Message]]:
    """Every message type: the catalogue's and the records they nest."""
    found: dict[str, type[Message]] = {}

    def visit(cls: type[Message]) -> None:
        if cls.__name__ in found:
            return
        found[cls.__name__] = cls
        for field in fields(cls):
            codec = field.metadata["codec"]
            while isinstance(codec, (c.Nullable, c.Seq, c.Dict)):
                codec = getattr(codec, "inner", None) or getattr(codec, "item", None) or codec.value
            if isinstance(codec, c.Nested):
                visit(codec.cls)
            if isinstance(codec, TaggedPayload):
                for payload in PAYLOADS.values():
                    visit(payload)
            if isinstance(codec, TaggedAnswer):
                for answer in ANSWERS.values():
                    visit(answer)

    for exchange in OPERATIONS.values():
        for cls in (exchange.request, exchange.answer):
            if cls is not None:
                visit(cls)
    return sorted(found.values(), key=lambda cls: cls.__name__)


def _record_schemas(schemas: list[Any], codec: c.Codec[Any]) -> tuple[list[Any], c.Codec[Any]]:
    """Descend through null / list / map wrappers to the schemas of the record inside."""
    while isinstance(codec, (c.Nullable, c.Seq, c.Dict)):
        if isinstance(codec, c.Nullable):
            codec = codec.inner
            schemas = [
                part
                for s in schemas
                for part in (resolve(s).get("oneOf") or resolve(s).get("anyOf") or [s])
                if resolve(part).get("type") != "null"
            ]
        elif isinstance(codec, c.Seq):
            codec = codec.item
            schemas = [resolve(s)["items"] for s in schemas if "items" in resolve(s)]
        else:
            codec = codec.value
            schemas = [
                resolve(s)["additionalProperties"]
                for s in schemas
                if isinstance(resolve(s).get("additionalProperties"), Mapping)
            ]
    return schemas, codec


def drift(cls: type[Message], schema: Any, where: str) -> list[str]:
    """Where ``cls`` (and every record nested in it) writes other keys than ``schema``
    documents; envelope keys aside."""
    documented = set(properties(schema)) - {"v", "server_time_ms"}
    written = keys(cls)
    found = []
    if written != documented:
        found.append(
            f"{where} ({cls.__name__}): only in the type {sorted(written - documented)}, "
            f"only in the contract {sorted(documented - written)}"
        )
    props = properties(schema)
    for field in fields(cls):
        subs, codec = _record_schemas(props.get(field.name, []), field.metadata["codec"])
        if isinstance(codec, c.Nested) and not field.metadata["flatten"]:
            if not subs:
                found.append(f"{where}.{field.name}: the contract does not describe it")
            for sub in subs:
                found += drift(codec.cls, sub, f"{where}.{field.name}")
    return found
