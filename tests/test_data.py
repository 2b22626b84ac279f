"""Tests for segrec.data: reading and validating the log, the catalogue and the attributes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from segrec.data import (
    MAX_PROBLEMS,
    Dataset,
    ItemColumns,
    LogColumns,
    item_text,
    load_dataset,
    read_table,
)
from segrec.errors import InputError

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"

CATALOGUE = """item_id,title,description,category
A,Alpha,First item.,Books|Fiction
B,Beta,,Books
C,,Gamma gadget,Electronics;Gadgets
"""

LOG = """user_id,item_id,behavior,value,timestamp
u1,A,view,,2024-05-01T12:00:00Z
u1,B,purchase,19.99,2024-05-01
u2,A,rating,4.5,2024-05-02T10:00:00+02:00
u2,C,view,,1714640000
"""

HEADER = "user_id,item_id,behavior,value,timestamp\n"


def write(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def load(
    tmp_path: Path, log: str | bytes, items: str | bytes = CATALOGUE, **kwargs: Any
) -> Dataset:
    return load_dataset(
        write(tmp_path, "log.csv", log), write(tmp_path, "items.csv", items), **kwargs
    )


def input_error(call: Callable[[], object], *parts: str) -> str:
    """The InputError message of ``call``, checked to be one line holding every part."""
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# --- the real MovieLens files -------------------------------------------------------------------

needs_movielens = pytest.mark.skipif(
    not (MOVIELENS / "ratings.csv").exists(), reason="ml-latest-small is not in ../shared/data"
)


@pytest.fixture(scope="module")
def movielens() -> Dataset:
    return load_dataset(MOVIELENS / "ratings.csv", MOVIELENS / "movies.csv")


@needs_movielens
def test_movielens_loads_every_rating(movielens: Dataset) -> None:
    ratings = movielens.interactions
    assert len(ratings) == 100_836
    assert ratings["user_id"].nunique() == 610
    assert len(movielens.items) == 9_742
    assert movielens.report.behaviors == {"rating": 100_836}
    assert movielens.report.log_rows == 100_836
    assert movielens.report.item_rows == 9_742
    assert (movielens.report.loaded, movielens.report.skipped) == (100_836, 0)
    assert movielens.attributes is None
    assert list(ratings.columns) == ["user_id", "item_id", "behavior", "value", "timestamp", "line"]
    assert ratings["value"].dtype == np.float64
    assert ratings["timestamp"].dtype == "Int64"
    first = ratings.iloc[0]
    assert (first["user_id"], first["item_id"], first["value"]) == ("1", "1", 4.0)
    assert (first["timestamp"], first["line"]) == (964982703, 2)
    assert ratings["line"].iloc[-1] == 100_837
    assert ratings["value"].between(0.5, 5.0).all()
    assert any(
        "MovieLens layout (userId, movieId, rating, timestamp); behavior=rating" in n
        for n in movielens.report.notes
    )


@needs_movielens
def test_movielens_item_text_and_genres(movielens: Dataset) -> None:
    items = movielens.items.set_index("item_id")
    toy_story = items.loc["1"]
    assert toy_story["title"] == "Toy Story (1995)"
    assert toy_story["categories"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    assert toy_story["text"] == (
        "Toy Story (1995). Categories: Adventure, Animation, Children, Comedy, Fantasy."
    )
    assert items.loc["11", "title"] == "American President, The (1995)"  # quoted comma
    assert items.loc["114335", "categories"] == []  # "(no genres listed)"
    assert items.loc["114335", "text"] == "La cravate (1957)."
    assert any(
        "'(no genres listed)'" in note and "34 items" in note for note in movielens.report.notes
    )


@needs_movielens
def test_loading_is_deterministic(movielens: Dataset) -> None:
    again = load_dataset(MOVIELENS / "ratings.csv", MOVIELENS / "movies.csv")
    pd.testing.assert_frame_equal(again.interactions, movielens.interactions)
    pd.testing.assert_frame_equal(again.items, movielens.items)
    assert again.report == movielens.report


# --- a generic log and catalogue -----------------------------------------------------------------


def test_generic_log_with_iso_timestamps(tmp_path: Path) -> None:
    data = load(tmp_path, LOG)
    log = data.interactions
    assert log["behavior"].tolist() == ["view", "purchase", "rating", "view"]
    assert log["value"].tolist()[1:3] == [19.99, 4.5]
    assert np.isnan(log["value"].iloc[0])
    assert log["timestamp"].tolist() == [1714564800, 1714521600, 1714636800, 1714640000]
    assert log["line"].tolist() == [2, 3, 4, 5]
    assert data.report.behaviors == {"view": 2, "purchase": 1, "rating": 1}
    assert any("ISO-8601" in note for note in data.report.notes)


def test_catalogue_description_and_categories(tmp_path: Path) -> None:
    items = load(tmp_path, LOG).items
    assert list(items.columns) == ["item_id", "title", "description", "categories", "text"]
    assert items["categories"].tolist() == [
        ["Books", "Fiction"],
        ["Books"],
        ["Electronics", "Gadgets"],
    ]
    assert items["text"].tolist() == [
        "Alpha. First item. Categories: Books, Fiction.",
        "Beta. Categories: Books.",
        "Gamma gadget. Categories: Electronics, Gadgets.",
    ]


def test_several_category_columns_and_comma_separated_tags(tmp_path: Path) -> None:
    items = 'item_id,name,genres,tags\n1,One,Drama|Comedy,"funny, comedy , quirky"\n2,Two,,\n'
    data = load(tmp_path, "user,item\nu,1\nu,2\n", items)
    assert data.items["categories"].tolist() == [
        ["Drama", "Comedy", "funny", "comedy", "quirky"],
        [],
    ]


def test_item_text_leaves_out_empty_parts() -> None:
    assert item_text("Heat (1995)", "", ["Action", "Crime"]) == (
        "Heat (1995). Categories: Action, Crime."
    )
    assert item_text("", "A heist goes wrong!", []) == "A heist goes wrong!"
    assert item_text("Heat", "A heist.", []) == "Heat. A heist."
    assert item_text("", "", []) == ""


def test_log_without_behavior_value_or_timestamp(tmp_path: Path) -> None:
    data = load(tmp_path, "customer_id,product_id\nc1,A\nc2,B\nc1,C\n")
    log = data.interactions
    assert log["behavior"].tolist() == ["interaction"] * 3
    assert log["value"].isna().all()
    assert log["timestamp"].isna().all()
    notes = " ".join(data.report.notes)
    assert "behavior=interaction" in notes
    assert "order of rows in the file is the order of events" in notes


def test_rating_column_without_behavior_means_rating(tmp_path: Path) -> None:
    data = load(tmp_path, "userId,itemId,Rating\n1,A,3\n")
    assert data.interactions["behavior"].tolist() == ["rating"]
    assert any("behavior=rating" in note for note in data.report.notes)


def test_column_mapping_overrides_detection(tmp_path: Path) -> None:
    log = "uid,sku,evt,amt,when,user_id\n7,x1,buy,3,1700000000,ignored\n"
    items = "id,headline,body,labels\nx1,Widget,A small widget,Tools|Home\n"
    data = load(
        tmp_path,
        log,
        items,
        log_columns=LogColumns(
            user="uid", item="sku", behavior="evt", value="amt", timestamp="when"
        ),
        item_columns=ItemColumns(
            item="id", title="headline", description="body", categories=("labels",)
        ),
    )
    row = data.interactions.iloc[0]
    assert (row["user_id"], row["item_id"], row["behavior"], row["value"]) == (
        "7",
        "x1",
        "buy",
        3.0,
    )
    assert row["timestamp"] == 1_700_000_000
    assert data.items.iloc[0]["text"] == "Widget. A small widget. Categories: Tools, Home."


def test_detection_ignores_case_and_separators(tmp_path: Path) -> None:
    data = load(tmp_path, "User ID,ITEM_ID,Event Type\n1,A,click\n")
    assert data.interactions[["user_id", "item_id", "behavior"]].values.tolist() == [
        ["1", "A", "click"]
    ]


def test_read_table_line_numbers(tmp_path: Path) -> None:
    content = '\ufeffa,b\r\n1,"x, y"\r\n\r\n2, "He said ""hi"""\r\n3,plain\r\n'
    frame = read_table(write(tmp_path, "t.csv", content))
    assert list(frame.columns) == ["a", "b", "line"]
    assert frame["a"].tolist() == ["1", "2", "3"]
    assert frame["b"].tolist() == ["x, y", 'He said "hi"', "plain"]
    assert frame["line"].tolist() == [2, 4, 5]


def test_read_table_with_other_delimiters(tmp_path: Path) -> None:
    frame = read_table(write(tmp_path, "t.tsv", "a\tb\n1\tx;y\n"), delimiter="\\t")
    assert frame[["a", "b"]].values.tolist() == [["1", "x;y"]]
    frame = read_table(write(tmp_path, "t.csv", "a;b\n1;2\n"), delimiter=";")
    assert frame[["a", "b"]].values.tolist() == [["1", "2"]]


# --- Parquet --------------------------------------------------------------------------------------


def test_parquet_input_matches_csv(tmp_path: Path) -> None:
    from_csv = load(tmp_path, LOG)
    log = pd.read_csv(tmp_path / "log.csv", dtype=str, keep_default_na=False)
    log["value"] = pd.to_numeric(log["value"])
    log.to_parquet(tmp_path / "log.parquet")
    pd.read_csv(tmp_path / "items.csv", dtype=str, keep_default_na=False).to_parquet(
        tmp_path / "items.pq"
    )
    from_parquet = load_dataset(tmp_path / "log.parquet", tmp_path / "items.pq")
    expected = from_csv.interactions.assign(line=from_csv.interactions["line"] - 1)
    pd.testing.assert_frame_equal(from_parquet.interactions, expected)
    pd.testing.assert_frame_equal(from_parquet.items, from_csv.items)


def test_parquet_typed_columns(tmp_path: Path) -> None:
    """Integer ids, datetime timestamps and list categories come through as text."""
    pd.DataFrame(
        {
            "user_id": [1, 2],
            "item_id": [10, 20],
            "timestamp": pd.to_datetime(["2024-05-01T12:00:00Z", "2024-05-02T00:00:00Z"]),
        }
    ).to_parquet(tmp_path / "log.parquet")
    pd.DataFrame(
        {"item_id": [10, 20], "title": ["Ten", "Twenty"], "tags": [["a", "b"], []]}
    ).to_parquet(tmp_path / "items.parquet")
    data = load_dataset(tmp_path / "log.parquet", tmp_path / "items.parquet")
    assert data.interactions["user_id"].tolist() == ["1", "2"]
    assert data.interactions["timestamp"].tolist() == [1714564800, 1714608000]
    assert data.interactions["line"].tolist() == [1, 2]
    assert data.items["categories"].tolist() == [["a", "b"], []]


def test_parquet_errors_name_the_row(tmp_path: Path) -> None:
    pd.DataFrame({"user_id": ["1", "2"], "item_id": ["A", "Z"]}).to_parquet(
        tmp_path / "log.parquet"
    )
    write(tmp_path, "items.csv", CATALOGUE)
    input_error(
        lambda: load_dataset(tmp_path / "log.parquet", tmp_path / "items.csv"),
        "log.parquet: row 2:",
        "'Z'",
        "not in the catalogue",
    )


def test_corrupt_parquet(tmp_path: Path) -> None:
    log = write(tmp_path, "log.parquet", b"this is not parquet")
    input_error(lambda: read_table(log), "log.parquet", "not a readable Parquet file")


# --- attributes ----------------------------------------------------------------------------------


def test_attributes(tmp_path: Path) -> None:
    write(
        tmp_path,
        "users.csv",
        "user_id,age_band,region,signup\nu1,25-34,EU,2024-05-01\n"
        "u2,35-44,US,2024-01-03\nu9,18-24,EU,2023-02-02\n",
    )
    data = load(tmp_path, LOG, attributes=tmp_path / "users.csv")
    assert data.attributes is not None
    assert data.attributes.values.tolist() == [
        ["u1", "25-34", "EU", "2024-05-01"],
        ["u2", "35-44", "US", "2024-01-03"],
    ]
    assert list(data.attributes.columns) == ["user_id", "age_band", "region", "signup"]
    assert any("dropped 1 rows for users not in the log" in note for note in data.report.notes)


def test_attributes_user_column_by_name(tmp_path: Path) -> None:
    write(tmp_path, "users.csv", "member,gender\nu1,f\n")
    data = load(tmp_path, LOG, attributes=tmp_path / "users.csv", attribute_user_column="member")
    assert data.attributes is not None
    assert data.attributes.values.tolist() == [["u1", "f"]]


@pytest.mark.parametrize(
    "column", ["email", "E-Mail", "Phone", "first_name", "Surname", "zip", "date_of_birth", "IP"]
)
def test_attributes_refuse_pii_by_name(tmp_path: Path, column: str) -> None:
    write(tmp_path, "users.csv", f"user_id,age_band,{column}\nu1,25-34,x\n")
    input_error(
        lambda: load(tmp_path, LOG, attributes=tmp_path / "users.csv"),
        "users.csv",
        repr(column),
        "drop the column; segrec never sends personal data to an LLM",
    )


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (["contact: ann@example.com", "bob.smith+x@mail.example.org"], "e-mail addresses"),
        (["+44 20 7946 0958", "(555) 123-4567"], "phone numbers"),
        (["555-123-4567", "0612345678"], "phone numbers"),
    ],
)
def test_attributes_refuse_pii_by_values(tmp_path: Path, values: list[str], kind: str) -> None:
    rows = "".join(f'u{i},"{v}"\n' for i, v in enumerate(values, start=1))
    write(tmp_path, "users.csv", "user_id,extra\n" + rows)
    input_error(
        lambda: load(tmp_path, LOG, attributes=tmp_path / "users.csv"),
        "users.csv",
        "'extra'",
        kind,
        "drop the column",
    )


def test_attributes_keep_numbers_and_dates(tmp_path: Path) -> None:
    """Amounts, ids and dates have many digits but are not phone numbers."""
    write(
        tmp_path,
        "users.csv",
        "user_id,income,signup,eu_date\nu1,1234567,2024-05-01,01.05.2024\n"
        "u2,7654321.50,2023-12-31,31/12/2023\n",
    )
    data = load(tmp_path, LOG, attributes=tmp_path / "users.csv")
    assert data.attributes is not None
    assert len(data.attributes) == 2


def test_attributes_duplicate_user(tmp_path: Path) -> None:
    write(tmp_path, "users.csv", "user_id,region\nu1,EU\nu2,US\nu1,US\n")
    input_error(
        lambda: load(tmp_path, LOG, attributes=tmp_path / "users.csv"),
        "users.csv:4:",
        "'u1' already appears on line 2",
        "one row per user",
    )


def test_attributes_need_a_user_column(tmp_path: Path) -> None:
    write(tmp_path, "users.csv", "member,region\nu1,EU\n")
    input_error(
        lambda: load(tmp_path, LOG, attributes=tmp_path / "users.csv"),
        "users.csv",
        "columns found: member, region",
        "--attributes-user-col NAME",
    )


# --- errors --------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    items = write(tmp_path, "items.csv", CATALOGUE)
    input_error(lambda: load_dataset(tmp_path / "nope.csv", items), "nope.csv", "not found")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    items = write(tmp_path, "items.csv", CATALOGUE)
    (tmp_path / "logs").mkdir()
    input_error(lambda: load_dataset(tmp_path / "logs", items), "logs", "is a directory")


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "is empty"), (b"\n\n", "is empty"), (HEADER.encode(), "header but no data rows")],
)
def test_empty_log(tmp_path: Path, content: bytes, expected: str) -> None:
    input_error(lambda: load(tmp_path, content), "log.csv", expected)


def test_empty_parquet(tmp_path: Path) -> None:
    pd.DataFrame({"user_id": pd.Series([], dtype=str)}).to_parquet(tmp_path / "log.parquet")
    input_error(lambda: read_table(tmp_path / "log.parquet"), "log.parquet", "no rows")


def test_missing_user_column(tmp_path: Path) -> None:
    input_error(
        lambda: load(tmp_path, "who,item_id\n1,A\n"),
        "log.csv",
        "no user id column",
        "columns found: who, item_id",
        "pass --user-col NAME",
    )


def test_missing_item_column(tmp_path: Path) -> None:
    input_error(lambda: load(tmp_path, "user_id,what\n1,A\n"), "log.csv", "pass --item-col NAME")


def test_catalogue_without_title_or_description(tmp_path: Path) -> None:
    input_error(
        lambda: load(tmp_path, LOG, "item_id,category\nA,x\n"),
        "items.csv",
        "columns found: item_id, category",
        "pass --title-col NAME or --description-col NAME",
    )


def test_catalogue_without_item_column(tmp_path: Path) -> None:
    input_error(lambda: load(tmp_path, LOG, "sku,title\nA,x\n"), "items.csv", "--item-id-col NAME")


def test_explicit_column_not_in_file(tmp_path: Path) -> None:
    input_error(
        lambda: load(tmp_path, LOG, log_columns=LogColumns(user="uid")),
        "log.csv",
        "'uid' (--user-col) not found",
        "columns found: user_id, item_id, behavior, value, timestamp",
    )
    input_error(
        lambda: load(tmp_path, LOG, item_columns=ItemColumns(categories=("genre",))),
        "items.csv",
        "'genre' (--category-col) not found",
    )


def test_one_column_mapped_twice(tmp_path: Path) -> None:
    input_error(
        lambda: load(tmp_path, LOG, log_columns=LogColumns(value="timestamp")),
        "log.csv",
        "'timestamp' is mapped to both",
    )


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        ("user_id;item_id\nu1;A\n", "pass --delimiter ';'"),
        ("user_id\titem_id\nu1\tA\n", "pass --delimiter '\\t'"),
        ("user_id|item_id\nu1|A\n", "pass --delimiter '|'"),
    ],
)
def test_wrong_delimiter(tmp_path: Path, content: str, hint: str) -> None:
    input_error(lambda: load(tmp_path, content), "log.csv:1:", "reads as one column", hint)


def test_semicolon_delimiter_on_a_comma_file(tmp_path: Path) -> None:
    path = write(tmp_path, "t.csv", "user_id,item_id\nu1,A\n")
    input_error(lambda: read_table(path, delimiter=";"), "t.csv:1:", "pass --delimiter ','")


def test_bad_delimiter_argument(tmp_path: Path) -> None:
    input_error(lambda: load(tmp_path, LOG, delimiter=";;"), "--delimiter", "one character")


def bad_row_cases() -> list[tuple[str, str, list[str]]]:
    """(name, log rows after the header, expected message parts) for every bad-row kind."""
    return [
        ("value", "u1,A,view,abc,1\n", ["log.csv:2:", "'value'", "'abc' is not a number"]),
        ("infinite", "u1,A,view,inf,1\n", ["log.csv:2:", "'inf' is not a number"]),
        ("timestamp", "u1,A,view,1,yesterday\n", ["log.csv:2:", "'yesterday'", "ISO-8601"]),
        ("millis", "u1,A,view,1,1714564800000\n", ["log.csv:2:", "milliseconds"]),
        ("user", ",A,view,1,1\n", ["log.csv:2:", "'user_id' is empty"]),
        ("item", "u1,,view,1,1\n", ["log.csv:2:", "'item_id' is empty"]),
        ("behavior", "u1,A,,1,1\n", ["log.csv:2:", "'behavior' is empty"]),
        ("unknown", "u1,Z,view,1,1\n", ["log.csv:2:", "'Z'", "not in the catalogue", "items.csv"]),
        ("ragged", "u1,A,view,1,1,extra\n", ["log.csv:2:", "6 fields but the header has 5"]),
        ("quote", 'u1,A,"view\nmore",1,1\n', ["log.csv:2:", "unbalanced quote"]),
    ]


@pytest.mark.parametrize(
    ("name", "rows", "parts"), bad_row_cases(), ids=[c[0] for c in bad_row_cases()]
)
def test_bad_row(tmp_path: Path, name: str, rows: str, parts: list[str]) -> None:
    input_error(lambda: load(tmp_path, HEADER + rows), *parts, "--skip-bad-rows")


def test_non_utf8_bytes(tmp_path: Path) -> None:
    log = (HEADER + "u1,A,view,1,1\nu2,A,caf\xe9,1,1\n").encode("latin-1")
    input_error(
        lambda: load(tmp_path, log),
        "log.csv:3:",
        "byte 0xe9 at character 9",
        "iconv -f latin1 -t utf-8",
    )


def test_duplicate_rows_name_both_lines(tmp_path: Path) -> None:
    log = HEADER + "u1,A,view,1,100\nu1,B,view,1,100\nu1,A,view,2,100\n"
    input_error(
        lambda: load(tmp_path, log),
        "log.csv:4:",
        "duplicate of line 2",
        "--skip-bad-rows to keep the first",
    )


def test_duplicate_item_ids(tmp_path: Path) -> None:
    input_error(
        lambda: load(tmp_path, LOG, CATALOGUE + "B,Beta again,,\n"),
        "items.csv:5:",
        "'B' already appears on line 3",
        "must be unique",
    )


def test_item_without_title_or_description(tmp_path: Path) -> None:
    input_error(
        lambda: load(tmp_path, LOG, CATALOGUE + "D,,,Books\n"),
        "items.csv:5:",
        "'D' has neither a title nor a description",
    )


def test_ragged_catalogue_row(tmp_path: Path) -> None:
    input_error(
        lambda: load(tmp_path, LOG, CATALOGUE + "D,Delta\n"),
        "items.csv:5:",
        "2 fields but the header has 4",
    )


def test_first_problem_in_file_order(tmp_path: Path) -> None:
    rows = "u1,A,view,1,100\nu1,A,view,1,100\nu1,A,view,1,1,extra\nu1,A,view,x,1\n"
    input_error(lambda: load(tmp_path, HEADER + rows), "log.csv:3:", "duplicate of line 2")
    rows = "u1,A,view,1,100\nu1,A,view,x,1\nu1,A,view,1,1,extra\n"
    input_error(lambda: load(tmp_path, HEADER + rows), "log.csv:3:", "'x' is not a number")
    rows = "u1,A,view,1,1\n\n\nu1,A,view,1,1,extra\nu1,A,view,x,1\n"
    input_error(lambda: load(tmp_path, HEADER + rows), "log.csv:5:", "6 fields")


# --- skip_bad_rows -------------------------------------------------------------------------------


def test_skip_bad_rows_counts(tmp_path: Path) -> None:
    rows = "".join(rows for _, rows, _ in bad_row_cases())
    good = "u1,A,view,1,100\nu2,B,buy,20,200\nu1,A,view,5,100\n"  # the third repeats the first
    log = (HEADER + good + rows + "u3,C,view,1,1\nu4,A,v\xe9w,1,1\n").encode("latin-1")
    data = load(tmp_path, log, skip_bad_rows=True)
    report = data.report
    assert data.interactions["user_id"].tolist() == ["u1", "u2", "u3"]
    assert data.interactions["line"].tolist() == [2, 3, 16]
    assert report.duplicates == 1
    # the quoted field that spans lines makes two bad lines; plus the undecodable line
    assert report.skipped == len(bad_row_cases()) + 2
    assert report.loaded == 3
    assert report.log_rows == 3 + report.skipped + 1
    assert report.problems[0].startswith(str(tmp_path / "log.csv") + ":5: ")
    assert "'abc' is not a number" in report.problems[0]
    assert "unbalanced quote" in report.problems[-2]
    assert "0xe9" in report.problems[-1]
    assert all("--skip-bad-rows" not in p for p in report.problems)
    assert any("duplicate of line 2" in note for note in report.notes)


def test_skip_bad_rows_keeps_twenty_messages(tmp_path: Path) -> None:
    log = HEADER + "u1,A,view,1,1\n" + "".join(f"u{i},A,view,bad{i},1\n" for i in range(30))
    report = load(tmp_path, log, skip_bad_rows=True).report
    assert (report.skipped, report.loaded) == (30, 1)
    assert len(report.problems) == MAX_PROBLEMS
    assert "'bad19'" in report.problems[-1]


def test_skip_bad_rows_still_refuses_broken_files(tmp_path: Path) -> None:
    input_error(lambda: load(tmp_path, "who,item_id\n1,A\n", skip_bad_rows=True), "--user-col")
    input_error(lambda: load(tmp_path, b"", skip_bad_rows=True), "is empty")
    input_error(
        lambda: load(tmp_path, "user_id;item_id\n1;A\n", skip_bad_rows=True), "--delimiter ';'"
    )
    input_error(
        lambda: load(tmp_path, HEADER + "u1,Z,view,1,1\n", skip_bad_rows=True),
        "no usable rows left",
        "not in the catalogue",
    )


def test_read_table_reports_first_bad_row(tmp_path: Path) -> None:
    path = write(tmp_path, "t.csv", "a,b\n1,2\n3\n")
    message = input_error(lambda: read_table(path), "t.csv:3:", "1 fields but the header has 2")
    assert "--skip-bad-rows" not in message
