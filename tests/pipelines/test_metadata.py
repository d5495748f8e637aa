"""The one converter from a stage's plain metadata to Dagster metadata values."""

import dagster as dg
import pytest

from arenaflow import io
from arenaflow.report import Image, Markdown, Path, Table, Url, counts_table
from pipelines.metadata import check_result, output, to_metadata

PNG = b"\x89PNG\r\n\x1a\nfake"


def test_plain_values_map_to_their_dagster_kind() -> None:
    fs, path = io.fs_for("memory://arenaflow-test/plot.png")  # an image read through fsspec
    fs.pipe(path, PNG)
    meta = to_metadata(
        {
            "flag": True,
            "count": 3,
            "share": 0.25,
            "name": "finetuned",
            "ids": [81, 82],
            "card": {"id": "arenaflow-chat"},
            "board": Table([{"model": "a|b", "rating": 1012.3456}], note="**note**"),
            "empty": Table([], empty="_none_"),
            "prose": Markdown("*x*"),
            "file": Path("/tmp/x.jsonl"),
            "link": Url("http://127.0.0.1:5000/#/runs/1"),
            "inline": Image("loss curve", png=PNG),
            "stored": Image("radar", uri="memory://arenaflow-test/plot.png"),
            "absent": None,
            "already": dg.MetadataValue.int(7),
        }
    )
    kinds = {k: type(v).__name__ for k, v in meta.items()}
    assert kinds == {
        "flag": "BoolMetadataValue",
        "count": "IntMetadataValue",
        "share": "FloatMetadataValue",
        "name": "TextMetadataValue",
        "ids": "JsonMetadataValue",
        "card": "JsonMetadataValue",
        "board": "MarkdownMetadataValue",
        "empty": "MarkdownMetadataValue",
        "prose": "MarkdownMetadataValue",
        "file": "PathMetadataValue",
        "link": "UrlMetadataValue",
        "inline": "MarkdownMetadataValue",
        "stored": "MarkdownMetadataValue",
        "already": "IntMetadataValue",
    }
    assert meta["board"].value == (
        "**note**\n\n| model | rating |\n| --- | --- |\n| a\\|b | 1012 |\n"
    )
    assert meta["empty"].value == "_none_"
    assert meta["inline"].value.startswith("![loss curve](data:image/png;base64,")
    assert meta["stored"].value == meta["inline"].value.replace("loss curve", "radar")


def test_counts_table_lists_largest_first() -> None:
    table = counts_table({"short": 1, "duplicate": 5})
    assert [r["reason"] for r in table.rows] == ["duplicate", "short"]


def test_output_links_the_mlflow_run_and_later_dicts_win() -> None:
    out = output({"uri": "x"}, {"a": 1}, {"a": 2}, mlflow_url="http://mlflow/run")
    assert out.value == {"uri": "x"}
    assert out.metadata["a"].value == 2
    assert isinstance(out.metadata["mlflow_run"], dg.UrlMetadataValue)
    assert "mlflow_run" not in output({}, {"a": 1}).metadata


def test_a_value_without_a_metadata_kind_is_refused() -> None:
    with pytest.raises(TypeError, match="no Dagster metadata type for object"):
        to_metadata({"thing": object()})


def test_a_library_check_becomes_a_check_result() -> None:
    warn = check_result(
        {"name": "c", "passed": False, "severity": "warn", "description": "d", "metadata": {"n": 1}}
    )
    assert (warn.check_name, warn.passed, warn.description) == ("c", False, "d")
    assert warn.severity == dg.AssetCheckSeverity.WARN and warn.metadata["n"].value == 1
    assert check_result({"passed": True}).severity == dg.AssetCheckSeverity.ERROR
