"""The rating group materialized by Dagster on hand-made judgments, with a real MLflow registry.

The upstream assets (judgments, scores, the finetuned model) are test-local stand-ins with the
same keys: they write FastChat judgment files and register a real version in the temp store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from arenaflow import io
from arenaflow.config import compose_config
from arenaflow.tracking import tracker_from_cfg
from pipelines.assets.rating import battles, champion_model, leaderboard
from pipelines.resources import HydraConfigResource

QUESTIONS = [81, 111, 121]


def base_overrides(home: Path, cache: Path) -> list[str]:
    # the stand-in checkpoint holds no weights: nothing to export to GGUF
    return [
        "experiment=test",
        f"paths.home={home}",
        f"paths.cache_dir={cache}",
        "model.gguf_export=[]",
    ]


def pair_rows(winner_by_q: dict[int, tuple[str, str]]) -> list[dict[str, Any]]:
    rows = []
    for q, (g1, g2) in winner_by_q.items():
        for turn in (1, 2):
            rows.append(
                {
                    "question_id": q,
                    "model_1": "finetuned",
                    "model_2": "base",
                    "g1_winner": g1,
                    "g2_winner": g2,
                    "judge": [
                        "smollm2-135m-instruct",
                        "pair-v2" if turn == 1 else "pair-v2-multi-turn",
                    ],
                    "g1_user_prompt": "...",
                    "g1_judgment": "[[A]]",
                    "g2_user_prompt": "...",
                    "g2_judgment": "[[B]]",
                    "turn": turn,
                    "tstamp": 1700000000.0 + q * 10 + turn,
                }
            )
    return rows


CALIBRATED = {"passed": True, "summary": "judge passed calibration on 3 questions", "figures": {}}


def upstream_assets(
    overrides: list[str],
    judged: list[dict[str, Any]],
    ckpt: Path,
    calibration: dict[str, Any] = CALIBRATED,
) -> list:
    @dg.asset(name="mt_bench_judgments")
    def judgments_stub() -> dict[str, Any]:
        cfg = compose_config(overrides)
        uri = io.artifact_uri(cfg, "mt_bench", "mt_bench", "model_judgment", "judge_pair.jsonl")
        io.write_jsonl(uri, judged)
        return {
            "pair_uri": uri,
            "single_uri": None,
            "judge_model": "smollm2-135m-instruct",
            "calibration": calibration,
        }

    @dg.asset(name="base_model")
    def base_stub() -> dict[str, Any]:
        """The real registration of a base checkpoint (once: a second run reuses the version)."""
        from arenaflow.train import register_base

        cfg = compose_config(overrides)
        info = {"path": str(ckpt), "name": "tiny-llama", "chat_template_hash": "x"}
        return {**info, **register_base(cfg, info)}

    @dg.asset(name="mt_bench_scores")
    def scores_stub() -> dict[str, Any]:
        return {
            "uri": "unused",
            "scores": {
                "finetuned": {"turn1": 6.0, "turn2": 5.0, "average": 5.5},
                "base": {"turn1": 4.0, "turn2": 3.0, "average": 3.5},
            },
        }

    @dg.asset(name="finetuned_model")
    def finetuned_stub() -> dict[str, Any]:
        cfg = compose_config(overrides)
        tracker = tracker_from_cfg(cfg)
        with tracker.start_run("train", cfg) as run:
            info = tracker.register_model(
                run, ckpt, cfg.tracking.registered_model_name, tags={"data_hash": "d4t4"}
            )
        return {
            "path": str(ckpt),
            "model_uri": f"models:/{info.name}/{info.version}",
            "version": info.version,
            "run_id": run.run_id,
            "final_loss": 1.0,
            "chat_template_hash": "x",
        }

    return [judgments_stub, scores_stub, finetuned_stub, base_stub]


def materialize(overrides, judged, ckpt, instance, **kw) -> dg.ExecuteInJobResult:
    return dg.materialize(
        [*upstream_assets(overrides, judged, ckpt, **kw), battles, leaderboard, champion_model],
        resources={"hydra": HydraConfigResource(overrides=overrides)},
        instance=instance,
    )


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    return d


def test_rating_group_promotes_then_guards_the_champion(af_home, model_cache, ckpt) -> None:
    overrides = [*base_overrides(af_home, model_cache), "rating.bootstrap_rounds=40"]
    instance = dg.DagsterInstance.ephemeral()
    good = pair_rows(
        {81: ("model_1", "model_1"), 111: ("model_1", "model_2"), 121: ("model_1", "model_1")}
    )
    good.append({**good[0]})  # a repeated judgment: counted, not scored twice
    good.append({**good[1], "question_id": 999, "g2_winner": "error"})
    result = materialize(overrides, good, ckpt, instance)
    assert result.success

    b = result.output_for_node("battles")
    assert b["count"] == 6 and b["models"] == ["base", "finetuned"]
    rows = list(io.read_jsonl(b["uri"]))
    assert {r["winner"] for r in rows} == {"model_a", "tie"}
    assert sum(r["winner"] == "tie" for r in rows) == 2
    bmeta = result.asset_materializations_for_node("battles")[0].metadata
    assert bmeta["invalid_total"].value == 2
    assert (
        "judge_error" in bmeta["invalid"].value and "duplicate_judgment" in bmeta["invalid"].value
    )

    lb = result.output_for_node("leaderboard")
    by_model = {r["model"]: r for r in lb["rows"]}
    assert by_model["base"]["rating"] == pytest.approx(1000.0)  # anchored on base
    assert by_model["finetuned"]["rating"] > 1000.0
    assert by_model["finetuned"]["mt_bench"] == 5.5 and by_model["finetuned"]["battles"] == 6
    assert by_model["finetuned"]["win_rate"] == pytest.approx((4 + 1) / 6)
    assert io.exists(lb["uri"])
    lmeta = result.asset_materializations_for_node("leaderboard")[0].metadata
    assert "| finetuned |" in lmeta["leaderboard"].value
    # no answer files here: no style counts, so the board stays raw and says why
    assert "lack the answers' style counts" in lmeta["style_control"].value
    assert (
        "| position |" in lmeta["judge_bias"].value
        and "decisive games" in lmeta["judge_bias"].value
    )
    for plot in ("rating_ci", "win_fraction", "battle_count"):
        assert lmeta[plot].value.startswith("![")
    assert "mlflow_run" in lmeta

    # The base is registered (v1) and becomes the first champion; the fine-tune (v2) won 4 and
    # tied 2 of 6 battles, lost none: its paired interval against the base is above zero.
    champ = result.output_for_node("champion_model")
    assert champ["promoted"] is True and champ["version"] == "2", champ["reason"]
    assert champ["model_uri"] == "models:/arenaflow-chat@champion"
    assert champ["incumbent_version"] == "1" and champ["diff_lower"] > 0
    assert champ["p_better"] > 0.95 and champ["served_role"] == "fine-tuned"
    paired = lb["paired"]["finetuned"]["base"]
    assert champ["diff"] == pytest.approx(paired["diff"]) and paired["lower"] > 0
    assert "| finetuned | base |" in lmeta["paired_differences"].value
    cfg = compose_config(overrides)
    tracker = tracker_from_cfg(cfg)
    base_v = tracker.get_version("arenaflow-chat", version="1")
    assert base_v.tags["arenaflow.role"] == "base" and base_v.tags["arenaflow.promoted_at"]
    v2 = tracker.get_version("arenaflow-chat", alias="champion")
    assert v2.version == "2" and v2.tags["arenaflow.promoted_over"] == "1"
    assert v2.tags["arenaflow.lineage.data_hash"] == "d4t4"
    assert v2.tags["arenaflow.lineage.judgments"].endswith("judge_pair.jsonl")
    assert float(v2.tags["arenaflow.rating"]) == pytest.approx(
        by_model["finetuned"]["rating"], abs=0.01
    )
    assert v2.tags["arenaflow.rating_scale"].startswith("anchor=base@1000")
    assert float(v2.tags["arenaflow.vs_champion_p_better"]) > 0.95
    meta = result.asset_materializations_for_node("champion_model")[0].metadata
    assert meta["outcome"].value == "promoted" and meta["served"].value == "v2 (fine-tuned)"
    assert "promoted finetuned (v2) over champion v1 (base)" in meta["reason"].value

    # Second run: a new fine-tune (v3) that loses every battle to the base; the base version is
    # reused. The champion (v2) is not a competitor: its tags on the anchored scale are the bar.
    bad = pair_rows({q: ("model_2", "model_2") for q in QUESTIONS})
    result2 = materialize(overrides, bad, ckpt, instance)
    assert result2.success
    assert result2.output_for_node("base_model")["version"] == "1"
    champ2 = result2.output_for_node("champion_model")
    # The best rated challenger is now the base itself, which cannot reach v2's recorded rating.
    assert champ2["promoted"] is False and champ2["challenger"] == "base"
    assert champ2["competitor_versions"] == {"finetuned": "3", "base": "1"}
    assert champ2["version"] == "2" and champ2["outcome"] == "kept"
    assert "version tags" in champ2["reason"] and "not significantly better" in champ2["reason"]
    assert tracker.get_version("arenaflow-chat", alias="champion").version == "2"
    v3 = tracker.get_version("arenaflow-chat", version="3")
    assert float(v3.tags["arenaflow.rating"]) < 1000.0
    meta2 = result2.asset_materializations_for_node("champion_model")[0].metadata
    assert meta2["promoted"].value is False and meta2["outcome"].value == "kept"


def test_an_uncalibrated_judge_rates_but_cannot_promote(af_home, model_cache, ckpt) -> None:
    overrides = [*base_overrides(af_home, model_cache), "rating.bootstrap_rounds=40"]
    failed = {
        "passed": False,
        "summary": "judge j failed calibration (pairwise_accuracy 0.33 < 0.75); use judge=gpt4",
        "figures": {"pairwise_accuracy": 0.33},
    }
    sweep = pair_rows({q: ("model_1", "model_1") for q in QUESTIONS})  # finetuned wins all
    result = materialize(overrides, sweep, ckpt, dg.DagsterInstance.ephemeral(), calibration=failed)
    assert result.success
    lb = result.output_for_node("leaderboard")
    assert lb["rows"][0]["model"] == "finetuned" and lb["judge_calibration"]["passed"] is False
    lmeta = result.asset_materializations_for_node("leaderboard")[0].metadata
    assert lmeta["judge_calibrated"].value is False
    assert "Uncalibrated judge" in lmeta["leaderboard"].value
    champ = result.output_for_node("champion_model")
    assert champ["promoted"] is False and champ["version"] == "1"  # the base stays
    assert champ["diff_lower"] > 0  # the evidence would have promoted it
    assert "failed calibration (pairwise_accuracy 0.33 < 0.75)" in champ["reason"]


def cast_votes(cfg, votes: list[tuple[str, str, str]], start: int = 0) -> None:
    """Arena votes through the real store at the configured URL (what the /arena page writes)."""
    from arenaflow.arena import VoteStore

    store = VoteStore.from_cfg(cfg)
    try:
        for i, (a, b, winner) in enumerate(votes, start=start):
            conv = [{"role": "user", "content": f"prompt {i}"}]
            assert store.record_vote(
                battle_id=f"b{i}",
                model_a=a,
                model_b=b,
                winner=winner,
                anony=True,
                conversation_a=[*conv, {"role": "assistant", "content": "a"}],
                conversation_b=[*conv, {"role": "assistant", "content": "b"}],
                client_id=f"client-{i % 3}",
            )
    finally:
        store.dispose()


def test_human_votes_join_the_judge_battles_and_the_leaderboard(af_home, model_cache, ckpt) -> None:
    overrides = [*base_overrides(af_home, model_cache), "rating.bootstrap_rounds=40"]
    cfg = compose_config(overrides)
    # Humans disagree with the judge: base wins most human votes; one vote involves a model that
    # is not a competitor of this evaluation (it is still a battle, reported separately).
    human = [("finetuned", "base", "model_b")] * 5 + [("base", "finetuned", "tie")]
    human += [("finetuned", "base", "model_a"), ("base", "other-model", "model_a")]
    cast_votes(cfg, human)
    judged = pair_rows({q: ("model_1", "model_1") for q in QUESTIONS})  # judge: finetuned wins all
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [*upstream_assets(overrides, judged, ckpt), battles, leaderboard],
        resources={"hydra": HydraConfigResource(overrides=overrides)},
        instance=instance,
    )
    assert result.success
    b = result.output_for_node("battles")
    assert b["by_source"] == {"judge": 6, "human": 8}
    assert b["human_votes"]["votes"] == 8
    rows = list(io.read_jsonl(b["uri"]))
    assert sorted({r["source"] for r in rows}) == ["human", "judge"]
    assert sum(r["source"] == "human" and r["winner"] == "tie" for r in rows) == 1
    bmeta = result.asset_materializations_for_node("battles")[0].metadata
    assert bmeta["human_battles"].value == 8 and bmeta["judge_battles"].value == 6

    lb = result.output_for_node("leaderboard")
    assert lb["rating_on"] == "combined"
    by_model = {r["model"]: r for r in lb["rows"]}
    fin = by_model["finetuned"]
    # judge-only: finetuned above base; human-only: below; combined: in between, all with CIs
    assert fin["judge_rating"] > 1000.0 > fin["human_rating"]
    assert fin["human_rating"] < fin["combined_rating"] < fin["judge_rating"]
    for view in ("judge", "human", "combined"):
        assert fin[f"{view}_ci_lower"] <= fin[f"{view}_rating"] <= fin[f"{view}_ci_upper"]
    assert fin["judge_battles"] == 6 and fin["human_battles"] == 7
    assert by_model["other-model"]["judge_rating"] is None  # human votes only
    lmeta = result.asset_materializations_for_node("leaderboard")[0].metadata
    table = lmeta["ratings"].value
    assert "judge CI" in table and "human CI" in table and "combined CI" in table
    # one shared pair (finetuned vs base): judge always says finetuned; humans 1 of 7 (1 tie)
    assert lmeta["agreement_shared_pairs"].value == 1
    assert lmeta["agreement_with_tie"].value == pytest.approx(1 / 7)
    assert lmeta["agreement_without_tie"].value == pytest.approx(1 / 6)

    # The human-only board can drive promotion; no human battles for it is a clear error.
    only_judge = [*overrides, "rating.promote_on=human", "rating.human_votes=false"]
    failed = dg.materialize(
        [*upstream_assets(only_judge, judged, ckpt), battles, leaderboard],
        resources={"hydra": HydraConfigResource(overrides=only_judge)},
        instance=instance,
        raise_on_error=False,
    )
    assert not failed.success
    err = [e for e in failed.all_events if e.is_step_failure][0]
    assert "no human battles" in err.step_failure_data.error.to_string()


def test_vote_sensor_requests_a_refresh_after_enough_new_votes(af_home, model_cache, ckpt) -> None:
    from pipelines.assets.rating import arena_votes_sensor

    overrides = [*base_overrides(af_home, model_cache), "rating.vote_sensor.min_new_votes=3"]
    cfg = compose_config(overrides)
    instance = dg.DagsterInstance.ephemeral()
    resources = {"hydra": HydraConfigResource(overrides=overrides)}

    def tick(cursor: str | None = None):
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
        return arena_votes_sensor(ctx), ctx.cursor

    out, _ = tick()
    assert isinstance(out, dg.SkipReason) and "no vote database" in out.skip_message
    cast_votes(cfg, [("finetuned", "base", "model_a")] * 4)
    out, _ = tick()
    assert isinstance(out, dg.SkipReason) and "never materialized" in out.skip_message
    dg.materialize(
        upstream_assets(overrides, pair_rows({81: ("model_1", "model_2")}), ckpt)[:2],
        resources=resources,
        instance=instance,
    )
    out, cursor = tick()
    assert isinstance(out, dg.RunRequest) and cursor == "4"
    assert out.tags["arenaflow/new_votes"] == "4"
    out, cursor2 = tick(cursor)
    assert isinstance(out, dg.SkipReason) and "0 new vote(s)" in out.skip_message
    cast_votes(cfg, [("base", "finetuned", "tie")] * 2, start=4)
    out, _ = tick(cursor)
    assert isinstance(out, dg.SkipReason) and "waiting for 3" in out.skip_message
    cast_votes(cfg, [("base", "finetuned", "model_b")], start=6)
    out, cursor3 = tick(cursor)
    assert isinstance(out, dg.RunRequest) and cursor3 == "7"
    assert out.job_name in (None, "rating_refresh_job")
