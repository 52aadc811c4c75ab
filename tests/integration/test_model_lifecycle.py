"""The data scientist's loop against a real NBV process: simulate traffic, export the training
log, train from the config, evaluate (metrics + model card), promote, and see it served."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from models.features import FEATURES
from models.simulator.driver import simulate
from models.simulator.truth import TruthLog, read_truth
from tests.harness import TEST_ADMIN_KEY, ServiceProcess, auth_headers, eventually

NBV = [sys.executable, "-m", "services.cli"]


def _nbv(args: list[str], env: dict[str, str]) -> str:
    import os

    done = subprocess.run(
        [*NBV, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_export_train_evaluate_promote(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    env = {
        "NBV_BUS": "embedded",
        "NBV_DATABASE_URL": "",
        "NBV_DATA_DIR": str(tmp_path / "data"),
        "NBV_MODEL_DIR": str(registry),
        "NBV_EXPLORATION_EPSILON": "0.3",
        "NBV_DECISION_SEED": "3",
        "NBV_MODEL_POLL_S": "0.2",
        "NBV_CONTACT_CAP_PER_DAY": '{"in_app": 100000}',
        "NBV_CONTACT_CAP_PER_WEEK": '{"in_app": 100000}',
        "NBV_LOG_LEVEL": "WARNING",
    }
    proc = ServiceProcess(["run"], env, tmp_path, "nbv")
    try:
        await proc.wait_ready()
        truth = TruthLog(tmp_path / "truth.jsonl")
        weeks, sim = await simulate(
            proc.url, accounts=4, weeks=2, seed=4, api_key=TEST_ADMIN_KEY, truth=truth
        )
        truth.close()
        assert sum(w.decisions for w in weeks) > 20
        assert all(s.model_version == "rules-v1" for s in sim.shown)

        out = tmp_path / "log.parquet"
        exported = json.loads(_nbv(["model", "export", "--out", str(out)], env))
        table = pq.read_table(out)
        assert exported["rows"] == table.num_rows > exported["shown"] > 0
        assert set(FEATURES) <= set(table.column_names)
        # Every first card the simulator showed is in the log, with the propensity it was shown
        # with, and its reward.
        first = {r["decision_id"]: r for r in table.to_pylist() if r["shown"] and r["rank"] == 1}
        for s in sim.shown:
            row = first[s.decision_id]
            assert row["element_id"] == s.element_id
            assert abs(row["propensity"] - s.propensity) < 1e-6
            assert row["reward"] == s.reward
        # The hidden truth names the decisions as NBV logged them, and covers every element
        # that was eligible in each (bench/replay.py scores rankings of them).
        records = {r.decision_id: r for r in read_truth(tmp_path / "truth.jsonl")}
        assert set(records) == {s.decision_id for s in sim.shown}
        for r in table.to_pylist():
            if r["decision_id"] in records:
                assert r["element_id"] in records[r["decision_id"]].p_completed

        trained = json.loads(
            _nbv(
                [
                    "model",
                    "train",
                    "--data",
                    str(out),
                    "--registry",
                    str(registry),
                    "--version",
                    "lgbm-test",
                ],
                env,
            )
        )
        assert trained["version"] == "lgbm-test" and trained["registered"] is True
        report = json.loads(
            _nbv(
                [
                    "model",
                    "evaluate",
                    "--data",
                    str(out),
                    "--registry",
                    str(registry),
                    "--version",
                    "lgbm-test",
                ],
                env,
            ).splitlines()[0]
        )
        op = report["off_policy"]
        assert op["decisions"] > 0
        for name in ("ips", "snips", "dr"):
            assert op[name]["low"] <= op[name]["estimate"] <= op[name]["high"]
        folder = registry / "lgbm-test"
        card = (folder / "card.md").read_text()
        assert "doubly robust" in card and "ndcg@3" in card
        assert (folder / "feature_importance.png").stat().st_size > 1000
        assert (folder / "off_policy.png").stat().st_size > 1000

        # Train registered it in the store; evaluate attached its report there too.
        listed = json.loads(_nbv(["model", "list", "--json"], env))
        [row] = listed["versions"]
        assert (row["version"], row["status"]) == ("lgbm-test", "candidate")
        assert row["headline"]["dr"] == op["dr"]["estimate"]
        assert "now serving: champion lgbm-test" in _nbv(["model", "promote", "lgbm-test"], env)
        user = sim.shown[0].user_id
        async with httpx.AsyncClient(
            base_url=proc.url, timeout=10, headers=auth_headers()
        ) as client:

            async def served() -> str:
                r = await client.get("/v1/next-best-value", params={"user_id": user})
                return str(r.json()["model_version"])

            await eventually(served, lambda v: v == "lgbm-test", timeout=15, what="hot swap")
    finally:
        proc.stop()
