"""Playbooks and decision rules as data (``services/decision/playbooks/*.yaml``).

A playbook reacts to trigger names (plain strings, so a renamed trigger is fixed in YAML): it
picks its audience, then schedules its steps on the durable scheduler, each step offering one
element on one channel after a delay, owned by automation or the CSM, with an SLA. A cancel
trigger (e.g. ``usage_recovered``) cancels the person's remaining steps.

A rule applies to every decision whose context matches its conditions: it can ``require``
elements (offered first when eligible), ``boost`` them (the business lever of arbitration) or
``exclude`` them (recorded as ``rule:<name>``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.decision.library import Slug, ValueElement
from shared.envelope import Channel, Role

DEFAULT_PLAYBOOKS = Path(__file__).with_name("playbooks")
TriggerName = Annotated[str, Field(pattern=r"^[a-z0-9_]+$", max_length=100)]

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "in": lambda a, b: a in b,
    "not_in": lambda a, b: a not in b,
}


class Condition(BaseModel):
    """``fact op value`` over the decision's facts (see ``docs/decision.md`` for the names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fact: str = Field(min_length=1)
    op: Literal["==", "!=", "<", "<=", ">", ">=", "in", "not_in"]
    value: Any

    def holds(self, facts: Mapping[str, Any]) -> bool:
        actual = facts.get(self.fact)
        if actual is None:
            return False
        try:
            return bool(_OPS[self.op](actual, self.value))
        except TypeError:
            return False


class Audience(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    roles: list[Role] = Field(default_factory=list, description="empty: any role")
    conditions: list[Condition] = Field(default_factory=list)

    def admits(self, role: str | None, facts: Mapping[str, Any]) -> bool:
        if self.roles and (role is None or role not in self.roles):
            return False
        return all(c.holds(facts) for c in self.conditions)


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Slug
    delay_hours: float = Field(default=0, ge=0)
    element: Slug
    channel: Channel | None = Field(default=None, description="null: the person's preference")
    owner: Literal["automated", "csm"] = "automated"
    sla_hours: int | None = Field(default=None, ge=1)


class Playbook(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Slug
    description: str = ""
    triggers: list[TriggerName] = Field(min_length=1)
    audience: Audience = Audience()
    steps: list[Step] = Field(min_length=1)
    cancel_on: list[TriggerName] = Field(default_factory=list)
    sla_hours: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _unique_steps(self) -> Playbook:
        names = [s.name for s in self.steps]
        if len(names) != len(set(names)):
            raise ValueError("step names must be unique within a playbook")
        return self


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Slug
    description: str = ""
    when: list[Condition] = Field(default_factory=list)
    require: list[Slug] = Field(default_factory=list)
    boost: dict[Slug, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    exclude: list[Slug] = Field(default_factory=list)

    def fires(self, facts: Mapping[str, Any]) -> bool:
        return all(c.holds(facts) for c in self.when)


class PlaybookFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    playbooks: list[Playbook] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)


class PlaybookError(ValueError):
    pass


class PlaybookSet(BaseModel):
    playbooks: list[Playbook] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)

    def for_trigger(self, trigger: str) -> list[Playbook]:
        return [p for p in self.playbooks if trigger in p.triggers]

    def cancelled_by(self, trigger: str) -> list[Playbook]:
        return [p for p in self.playbooks if trigger in p.cancel_on]

    def by_name(self, name: str) -> Playbook | None:
        return next((p for p in self.playbooks if p.name == name), None)

    def check_elements(self, elements: Sequence[ValueElement]) -> list[str]:
        """References to elements the library does not hold (warnings: the library may be
        edited after the playbooks)."""
        known = {e.id for e in elements}
        missing = [
            f"playbook {p.name!r} step {s.name!r}: unknown element {s.element!r}"
            for p in self.playbooks
            for s in p.steps
            if s.element not in known
        ]
        for r in self.rules:
            for ref in [*r.require, *r.boost, *r.exclude]:
                if ref not in known:
                    missing.append(f"rule {r.name!r}: unknown element {ref!r}")
        return missing


def load_playbooks(path: Path = DEFAULT_PLAYBOOKS) -> PlaybookSet:
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    problems: list[str] = []
    result = PlaybookSet()
    for f in files:
        try:
            parsed = PlaybookFile.model_validate(yaml.safe_load(f.read_text()) or {})
        except (OSError, yaml.YAMLError) as exc:
            problems.append(f"{f.name}: {exc}")
            continue
        except ValidationError as exc:
            problems.extend(
                f"{f.name}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                for err in exc.errors()
            )
            continue
        result.playbooks.extend(parsed.playbooks)
        result.rules.extend(parsed.rules)
    names = [p.name for p in result.playbooks] + [r.name for r in result.rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"duplicate playbook/rule names: {', '.join(duplicates)}")
    if problems:
        raise PlaybookError("\n".join(problems))
    return result


def step_key(playbook: str, user_id: str, trigger_id: str, step: str) -> str:
    return f"playbook:{playbook}:{user_id}:{trigger_id}:{step}"


def step_prefix(playbook: str, user_id: str) -> str:
    return f"playbook:{playbook}:{user_id}:"
