"""What a fault run must show afterwards, as pure functions of what the channels were told,
the event log and the live projection (issue 9, section 5). `bench.faults` gathers the
inputs from the real stack; the unit tests feed them by hand."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

# What an accepted command leaves in the log, caused by its request id (`causation_id`):
# one of these sets, each type exactly once. A refused command leaves none of them (a failed
# portrait attempt's `IdentityVerificationFailed` is a refusal's record, not an effect).
EFFECTS: Mapping[str, tuple[frozenset[str], ...]] = {
    "IssueCaptcha": (frozenset(),),
    "StartSession": (frozenset({"SessionStarted", "IdentityVerified"}),),
    "AuthorizeElectronicCard": (frozenset({"ElectronicCardAuthorized"}),),
    "VerifyPortrait": (frozenset({"IdentityVerified"}),),
    "ReportLoss": (frozenset({"LossReported"}),),
    "CancelLoss": (frozenset({"LossCancelled"}),),
    # With the automatic-approval rule on, the approval is decided with the application.
    "SubmitReissueApplication": (frozenset({"ReissueApplied"}),
                                 frozenset({"ReissueApplied", "ReviewApproved"})),
    "DecideReview": (frozenset({"ReviewApproved"}), frozenset({"ReviewRejected"})),
    "CollectCard": (frozenset({"CardCollected"}),),
}
# The statuses that agree with a formal loss in force (DESIGN section 6).
FORMAL_LOSS_STATUSES = frozenset({"LOST", "REISSUE_APPLIED", "REISSUE_REJECTED",
                                  "IN_PRODUCTION", "READY_FOR_PICKUP", "CANCELLED"})

Outcome = Literal["accepted", "rejected", "no_reply"]


def mask_ref(citizen_ref: str | None) -> str:
    """How a report names a citizen: enough of the keyed hash to find them, no more."""
    return f"{citizen_ref[:8]}…" if citizen_ref else "?"


def mask_card(card_no: str | None) -> str:
    return f"…{card_no[-4:]}" if card_no else "-"


@dataclass(frozen=True, slots=True)
class Sent:
    """One request id as the channel saw it, after every resend."""

    request_id: str
    command: str
    service: str
    citizen_ref: str | None
    outcome: Outcome
    code: str
    sends: int = 1


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """The fields of an event-topic message the checks need."""

    event_id: str
    type: str
    citizen_ref: str
    stream_id: str
    version: int
    causation_id: str
    occurred_at: datetime
    data: Mapping[str, Any]

    @classmethod
    def parse(cls, body: Any) -> LoggedEvent | None:
        """The event, or None for anything that is not a readable envelope (poison)."""
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            return None
        try:
            fields = {name: body[name] for name in
                      ("event_id", "type", "citizen_ref", "stream_id", "causation_id")}
            version, occurred_at = body["version"], body["occurred_at"]
        except KeyError:
            return None
        if (not all(isinstance(v, str) for v in fields.values())
                or type(version) is not int or not isinstance(occurred_at, str)):
            return None
        try:
            when = datetime.fromisoformat(occurred_at)
        except ValueError:
            return None
        return cls(fields["event_id"], fields["type"], fields["citizen_ref"],
                   fields["stream_id"], version, fields["causation_id"], when, body["data"])


def distinct(events: Iterable[LoggedEvent]) -> list[LoggedEvent]:
    """Each event once: a redelivery of the same event id is the outbox's benign repeat."""
    seen: set[str] = set()
    result = []
    for event in events:
        if event.event_id not in seen:
            seen.add(event.event_id)
            result.append(event)
    return result


# --- lost and duplicated effects ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EffectFinding:
    kind: Literal["lost", "duplicated", "unacknowledged"]
    citizen_ref: str | None
    command: str
    request_id: str
    detail: str

    def describe(self) -> str:
        return (f"{self.kind}: {mask_ref(self.citizen_ref)} {self.command} "
                f"request {self.request_id[:8]}… {self.detail}")


def effect_findings(sent: Iterable[Sent], events: Iterable[LoggedEvent]) -> list[EffectFinding]:
    """Every accepted request has exactly one effect in the log; no other request has any."""
    caused: dict[str, Counter[str]] = defaultdict(Counter)
    for event in distinct(events):
        caused[event.causation_id][event.type] += 1
    findings = []
    for request in sent:
        alternatives = EFFECTS.get(request.command, (frozenset(),))
        effect_types = frozenset().union(*alternatives)
        found = Counter({t: n for t, n in caused.get(request.request_id, Counter()).items()
                         if t in effect_types})
        shown = ", ".join(f"{t}×{n}" for t, n in sorted(found.items())) or "no effect"

        def finding(kind: Literal["lost", "duplicated", "unacknowledged"], detail: str,
                    request: Sent = request) -> EffectFinding:
            return EffectFinding(kind, request.citizen_ref, request.command,
                                 request.request_id, detail)

        if request.outcome != "accepted":
            if found:
                findings.append(finding("unacknowledged",
                                        f"{request.outcome} ({request.code}) yet {shown}"))
            continue
        if any(n > 1 for n in found.values()):
            findings.append(finding("duplicated", f"accepted, log has {shown}"))
        elif not any(set(found) == set(alternative) for alternative in alternatives):
            findings.append(finding("lost", f"accepted, log has {shown}"))
    return findings


def timeline_findings(
    effects: Iterable[LoggedEvent], timelines: Mapping[str, Sequence[Mapping[str, Any]]],
    log_ids: set[str],
) -> list[str]:
    """The projection against the log: each effect once in its citizen's timeline, no entry
    twice, none the log does not hold."""
    findings = []
    for ref, entries in timelines.items():
        ids = Counter(str(e.get("event_id")) for e in entries)
        findings += [f"duplicated in the timeline: {mask_ref(ref)} event {eid[:8]}… ×{n}"
                     for eid, n in ids.items() if n > 1]
        findings += [f"timeline entry not in the log: {mask_ref(ref)} event {eid[:8]}…"
                     for eid in ids if eid not in log_ids]
    for event in distinct(effects):
        shown = {str(e.get("event_id")) for e in timelines.get(event.citizen_ref, ())}
        if event.event_id not in shown:
            findings.append(f"lost from the timeline: {mask_ref(event.citizen_ref)} "
                            f"{event.type} {event.event_id[:8]}…")
    return findings


# --- the card invariant -------------------------------------------------------------------


def card_violations(events: Iterable[LoggedEvent]) -> list[str]:
    """No `LossReported` names a card that an earlier `CardReissued` invalidated: earlier in
    time, or earlier in the loss stream (a `LossClosed` for the card that replaced it)."""
    by_citizen: dict[str, list[LoggedEvent]] = defaultdict(list)
    for event in distinct(events):
        by_citizen[event.citizen_ref].append(event)
    violations = []
    for ref, citizen_events in by_citizen.items():
        reissued = [e for e in citizen_events if e.type == "CardReissued"]
        replaced_by = {e.data.get("new_card_no"): e.data.get("old_card_no") for e in reissued}
        invalidated_at: dict[str, datetime] = {}
        for e in reissued:
            old = e.data.get("old_card_no")
            if isinstance(old, str):
                invalidated_at[old] = min(invalidated_at.get(old, e.occurred_at), e.occurred_at)
        closed_cards: set[str] = set()  # cards a LossClosed seen so far in the stream replaced
        loss_stream = sorted(
            (e for e in citizen_events if e.type in ("LossReported", "LossClosed")),
            key=lambda e: (e.stream_id, e.version))
        for e in loss_stream:
            if e.type == "LossClosed":
                old = replaced_by.get(e.data.get("new_card_no"))
                if isinstance(old, str):
                    closed_cards.add(old)
                continue
            card = e.data.get("card_no")
            if not isinstance(card, str):
                continue
            after_reissue = card in invalidated_at and invalidated_at[card] <= e.occurred_at
            if after_reissue or card in closed_cards:
                violations.append(
                    f"{mask_ref(ref)} LossReported v{e.version} names card {mask_card(card)}, "
                    "which an earlier CardReissued invalidated")
    return violations


def open_formal_losses(events: Iterable[LoggedEvent]) -> set[str]:
    """Citizens whose loss stream ends with a formal loss in force."""
    open_kind: dict[str, str | None] = {}
    stream = sorted((e for e in distinct(events) if e.type in (
        "LossReported", "LossCancelled", "LossClosed", "TemporaryLossExpired")),
        key=lambda e: (e.stream_id, e.version))
    for e in stream:
        kind = e.data.get("kind")
        open_kind[e.citizen_ref] = (kind if e.type == "LossReported" and isinstance(kind, str)
                                    else None)
    return {ref for ref, kind in open_kind.items() if kind == "formal"}


def status_violations(open_formal: Iterable[str],
                      statuses: Mapping[str, str | None]) -> list[str]:
    """Every citizen whose open loss is formal shows `LOST` or a reissue status."""
    return [f"{mask_ref(ref)} has a formal loss in force but shows {statuses.get(ref) or 'no row'}"
            for ref in sorted(open_formal) if statuses.get(ref) not in FORMAL_LOSS_STATUSES]


# --- the auditor's tools and the DLQs -----------------------------------------------------

Position = tuple[str, int, int]  # topic, partition, offset


@dataclass(frozen=True, slots=True)
class VerifyVerdict:
    """`audit verify`'s failures split into the poison this run wrote into the event topics
    (each must be flagged), failures at records from before this run (another run's, or
    another test's deliberately hostile ones, which a reused log keeps), and everything
    else (there must be none)."""

    expected: int
    unexpected: list[str]
    unflagged_poison: list[Position]
    earlier: int = 0

    @property
    def clean(self) -> bool:
        return not self.unexpected and not self.unflagged_poison


def verify_verdict(failures: Iterable[tuple[Position, str]], poison: Iterable[Position],
                   must_flag: Iterable[Position] = (),
                   since: Mapping[tuple[str, int], int] | None = None) -> VerifyVerdict:
    """`poison`: every planted message in the log (earlier runs' too, for the log keeps
    everything); `must_flag`: this run's, each of which verify must have reported; `since`:
    where this run's records start in each partition (offsets before it are older)."""
    planted = set(poison) | set(must_flag)
    starts = since or {}
    flagged: set[Position] = set()
    unexpected = []
    earlier = 0
    for position, description in failures:
        topic, partition, offset = position
        if position in planted:
            flagged.add(position)
        elif offset < starts.get((topic, partition), 0):
            earlier += 1
        else:
            unexpected.append(description)
    return VerifyVerdict(len(flagged), unexpected, sorted(set(must_flag) - flagged), earlier)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    key: bytes | None
    code: str
    # The x-dlq-consumer and x-dlq-reason headers, as the service also logged them (a
    # chain break names the stream id, a hash, and the version): what a finding prints, so
    # that a failed run says which follower and which event it was.
    reason: str = ""


@dataclass
class DlqVerdict:
    by_reason: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    poison_not_dead_lettered: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.unexpected and not self.poison_not_dead_lettered


def dlq_verdict(letters: Iterable[DeadLetter], poison_keys: Mapping[bytes, str]) -> DlqVerdict:
    """Count dead letters by topic and reason; a dead letter that is not this run's poison is
    a real message that was not processed, and every poison must have landed in a DLQ."""
    verdict = DlqVerdict()
    landed: set[bytes] = set()
    for letter in letters:
        verdict.by_reason[(letter.topic, letter.code)] += 1
        if letter.key is not None and letter.key in poison_keys:
            landed.add(letter.key)
        else:
            verdict.unexpected.append(f"{letter.topic}: {letter.code}"
                                      + (f" ({letter.reason[:200]})" if letter.reason else ""))
    verdict.poison_not_dead_lettered = sorted(
        f"{poison_keys[key]} ({key.decode(errors='replace')[:16]}…)"
        for key in poison_keys if key not in landed)
    return verdict
