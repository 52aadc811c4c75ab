"""The model registry's logic: challenger routing, and promote / rollback / challenger history
on the embedded store (the same SQLAlchemy code runs on PostgreSQL in the integration test)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from models import registry_store as reg
from models.features import FEATURES, INDEX
from models.ranker import LightGBMRanker, RulePrior, save_model
from models.routing import ServingModels, bucket
from models.train import train_ranker, training_meta
from shared.store.db import create_engine, migrate, session_factory

USERS = [f"user-{i}" for i in range(20_000)]


class _Named(RulePrior):
    def __init__(self, version: str) -> None:
        self.version = version


def test_challenger_gets_its_share_of_people_and_each_person_one_model() -> None:
    serving = ServingModels(_Named("champ"), _Named("chall"), share=0.1, salt="chall")
    arms = [serving.for_user(u).version for u in USERS]
    share = arms.count("chall") / len(USERS)
    # Binomial(20 000, 0.1): σ ≈ 0.0021, so ±0.01 is beyond 4σ.
    assert share == pytest.approx(0.1, abs=0.01)
    again = ServingModels(_Named("champ"), _Named("chall"), share=0.1, salt="chall")
    assert [again.for_user(u).version for u in USERS] == arms  # stable, not per process


def test_raising_the_share_keeps_people_on_the_challenger_and_a_new_salt_reshuffles() -> None:
    small = {u for u in USERS if bucket(u, "s1") < 0.1}
    large = {u for u in USERS if bucket(u, "s1") < 0.3}
    assert small <= large and len(large) / len(USERS) == pytest.approx(0.3, abs=0.015)
    other = {u for u in USERS if bucket(u, "s2") < 0.1}
    # Independent draws: the overlap is about 0.1 × 0.1 of everyone, not the whole arm.
    assert len(small & other) / len(USERS) == pytest.approx(0.01, abs=0.005)


def test_without_a_challenger_everyone_gets_the_champion() -> None:
    serving = ServingModels(_Named("champ"), None, share=0.5, salt="x")
    assert {serving.for_user(u).version for u in USERS[:1000]} == {"champ"}


# ------------------------------------------------------------------ the store


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'nbv.sqlite'}"
    await migrate(url)
    engine = create_engine(url)
    yield session_factory(engine)
    await engine.dispose()


def _model_text(seed: int) -> str:
    rng = np.random.default_rng(seed)
    x = rng.random((120, len(FEATURES)))
    y = (x[:, INDEX["value_weight"]] > 0.5).astype(float)
    return str(train_ranker(x, y, [6] * 20, num_trees=3, seed=seed).model_to_string())


async def _register(sessions: async_sessionmaker[AsyncSession], *versions: str) -> None:
    async with sessions() as session, session.begin():
        for i, version in enumerate(versions):
            meta = {**training_meta(120, 20), "features": list(FEATURES)}
            await reg.register(session, version, _model_text(i), meta, by="ana")


async def _do(sessions: async_sessionmaker[AsyncSession], op: str, *args: object) -> reg.Assignment:
    async with sessions() as session, session.begin():
        if op == "promote":
            return await reg.promote(session, str(args[0]), by="ana")
        if op == "rollback":
            return await reg.rollback(session, by="ana", reason="worse on live traffic")
        if op == "challenger":
            return await reg.set_challenger(session, str(args[0]), float(str(args[1])), by="bo")
        assert op == "clear"
        return await reg.clear_challenger(session, by="bo")


async def _statuses(sessions: async_sessionmaker[AsyncSession]) -> dict[str, str]:
    async with sessions() as session:
        return {v.version: v.status for v in await reg.list_versions(session)}


async def test_rollback_walks_back_through_the_champions_to_the_rule_prior(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await _register(sessions, "m1", "m2", "m3")
    assert (await _do(sessions, "promote", "m1")).champion == "m1"
    await _do(sessions, "promote", "m2")
    await _do(sessions, "promote", "m3")
    assert await _statuses(sessions) == {"m1": "retired", "m2": "retired", "m3": "champion"}

    back = await _do(sessions, "rollback")
    assert (back.champion, back.action, back.changed_by) == ("m2", "rollback", "ana")
    assert back.reason == "worse on live traffic"
    # A promote after a rollback is remembered like any other: rolling it back returns here.
    await _do(sessions, "promote", "m3")
    assert (await _do(sessions, "rollback")).champion == "m2"
    assert (await _do(sessions, "rollback")).champion == "m1"
    rules = await _do(sessions, "rollback")
    assert rules.champion is None and rules.champion_version == RulePrior.version
    with pytest.raises(reg.Refused, match="nothing to roll back"):
        await _do(sessions, "rollback")
    assert set((await _statuses(sessions)).values()) == {"retired"}

    async with sessions() as session:
        changes = await reg.history(session, limit=100)
    assert [a.action for a in changes][:2] == ["rollback", "rollback"]
    assert [a.id for a in changes] == list(range(len(changes), 0, -1))


async def test_challenger_is_kept_across_promotes_and_cleared_when_it_becomes_champion(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await _register(sessions, "m1", "m2", "m3")
    # A first model can be tried against the rule prior.
    tried = await _do(sessions, "challenger", "m1", 0.2)
    assert (tried.champion, tried.challenger, tried.challenger_share, tried.salt) == (
        None,
        "m1",
        0.2,
        "m1",
    )
    wider = await _do(sessions, "challenger", "m1", 0.5)
    assert wider.salt == "m1" and wider.id == tried.id + 1  # same people stay on it
    same = await _do(sessions, "challenger", "m1", 0.5)
    assert same.id == wider.id  # nothing to change, nothing recorded

    promoted = await _do(sessions, "promote", "m1")
    assert (promoted.champion, promoted.challenger, promoted.challenger_share) == ("m1", None, 0)
    await _do(sessions, "challenger", "m2", 0.1)
    kept = await _do(sessions, "promote", "m3")
    assert (kept.champion, kept.challenger) == ("m3", "m2")
    assert await _statuses(sessions) == {"m1": "retired", "m2": "challenger", "m3": "champion"}
    with pytest.raises(reg.Refused, match="is the champion"):
        await _do(sessions, "challenger", "m3", 0.1)
    with pytest.raises(reg.Refused, match="between 0 and 1"):
        await _do(sessions, "challenger", "m2", 1.0)
    cleared = await _do(sessions, "clear")
    assert cleared.challenger is None and cleared.salt == ""
    assert (await _statuses(sessions))["m2"] == "retired"


async def test_unknown_and_mismatched_versions_are_refused_with_a_reason(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await _register(sessions, "m1")
    with pytest.raises(reg.UnknownVersion, match=r"'nope' \(registered: m1"):
        await _do(sessions, "promote", "nope")
    async with sessions() as session, session.begin():
        other = [*FEATURES[:-1], "shoe_size"]
        await reg.register(session, "old", _model_text(5), {"features": other}, by="ana")
    with pytest.raises(reg.Refused, match=f"lacks {FEATURES[-1]} and has unknown shoe_size"):
        await _do(sessions, "promote", "old")
    with pytest.raises(reg.Refused, match="cannot serve"):
        await _do(sessions, "challenger", "old", 0.1)
    async with sessions() as session:
        listed = {v.version: v for v in await reg.list_versions(session)}
        assert (await reg.current_assignment(session)).id == 0  # nothing was assigned
    assert listed["m1"].features_match and not listed["old"].features_match


async def test_two_changes_from_the_same_state_do_not_both_win(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await _register(sessions, "m1", "m2")
    async with sessions() as session:
        state = await reg.current_assignment(session)  # what the second one saw
    await _do(sessions, "promote", "m1")  # the first one's change lands meanwhile
    async with sessions() as second, second.begin():
        with pytest.raises(reg.Conflict, match="changed meanwhile"):
            await reg._change(
                second,
                state,
                champion="m2",
                challenger=None,
                share=0.0,
                salt="",
                action="promote",
                by="bo",
                reason="",
                rollback_to=None,
            )
    async with sessions() as session:
        assert (await reg.current_assignment(session)).champion == "m1"


async def test_registration_is_immutable_and_carries_the_working_copy(
    sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    x = rng.random((120, len(FEATURES)))
    booster = train_ranker(x, (x[:, 0] > 0.5).astype(float), [6] * 20, num_trees=3)
    meta = {
        **training_meta(120, 20),
        "data_from": "2026-11-01T00:00:00+00:00",
        "data_until": "2026-11-08T00:00:00+00:00",
        "calibration": {"slope": 2.0, "intercept": -1.0},
    }
    folder = save_model(booster, tmp_path / "registry", "wc1", meta)
    evaluation = {"ranking": {"ndcg@3": 0.61, "map": float("nan")}, "off_policy": {}}
    (folder / "evaluation.json").write_text(json.dumps(evaluation))
    async with sessions() as session, session.begin():
        info, created = await reg.register_folder(session, tmp_path / "registry", "wc1", by="ana")
    assert created and info.data_from is not None and info.data_from.day == 1
    assert info.headline["ndcg@3"] == 0.61 and info.headline["map"] is None  # NaN → null
    async with sessions() as session, session.begin():
        _, again = await reg.register_folder(session, tmp_path / "registry", "wc1", by="ana")
        assert not again
        with pytest.raises(reg.Conflict, match="immutable"):
            await reg.register(session, "wc1", _model_text(9), meta, by="ana")
        with pytest.raises(reg.Refused, match="not a LightGBM model"):
            await reg.register(session, "junk", "tree\nnonsense", meta, by="ana")
        with pytest.raises(reg.Refused, match="rule prior"):
            await reg.register(session, "rules-v1", _model_text(1), meta, by="ana")
    async with sessions() as session:
        ranker = reg.build_ranker("wc1", await reg.load_ranker_artifact(session, "wc1"))
    assert isinstance(ranker, LightGBMRanker) and (ranker.slope, ranker.intercept) == (2.0, -1.0)
    assert ranker.score(np.zeros((2, len(FEATURES)))).shape == (2,)
