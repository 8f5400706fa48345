"""Canonical tags: both mapping directions, unknown codes, coverage, real lm-eval task names."""

from __future__ import annotations

from pathlib import Path

import lm_eval
import pytest

from components import languages as L


@pytest.mark.parametrize(("iso1", "tag"), [
    ("sw", "swh_Latn"), ("ar", "arb_Arab"), ("fa", "pes_Arab"), ("zh", "zho_Hans"),
    ("ms", "zsm_Latn"), ("et", "est_Latn"), ("lv", "lvs_Latn"), ("mn", "khk_Cyrl"),
    ("ne", "npi_Deva"), ("uz", "uzn_Latn"), ("az", "azj_Latn"), ("sq", "als_Latn"),
    ("en", "eng_Latn"), ("de", "deu_Latn"), ("ru", "rus_Cyrl"), ("th", "tha_Thai"),
    ("tr", "tur_Latn"), ("sr", "srp_Cyrl"), ("hi", "hin_Deva"), ("or", "ory_Orya"),
])
def test_iso639_1_both_ways(iso1: str, tag: str) -> None:
    assert L.from_iso639_1(iso1) == tag
    assert L.canonical_tag(iso1) == tag
    assert L.to_iso639_1(tag) == iso1


def test_round_trip_for_every_default_tag() -> None:
    for tag in L.known_tags():
        iso1 = L.to_iso639_1(tag)
        if iso1 is not None and L.from_iso639_1(iso1) == tag:
            assert L.canonical_tag(iso1) == tag
    # tags that share an ISO 639-1 code each map to it; the default comes back
    assert L.to_iso639_1("zho_Hant") == "zh" and L.to_iso639_1("arb_Latn") == "ar"


@pytest.mark.parametrize(("culturax", "tag"), [
    ("ru", "rus_Cyrl"), ("uk", "ukr_Cyrl"), ("el", "ell_Grek"), ("be", "bel_Cyrl"),
    ("ja", "jpn_Jpan"), ("tt", "tat_Cyrl"), ("kk", "kaz_Cyrl"), ("ba", "bak_Cyrl"),
    ("yi", "ydd_Hebr"), ("ckb", "ckb_Arab"), ("dv", "div_Thaa"), ("ce", "che_Cyrl"),
])
def test_non_latin_scripts_outside_and_inside_belebele(culturax: str, tag: str) -> None:
    assert L.culturax_tag(culturax) == tag


@pytest.mark.parametrize(("spelling", "tag"), [
    ("SWH_latn", "swh_Latn"), ("swh-Latn", "swh_Latn"), ("swh", "swh_Latn"),
    ("Swahili", "swh_Latn"), ("en-US", "eng_Latn"), ("sr_Latn", "srp_Latn"),
    ("kik_Latn", "kik_Latn"),  # not in the table, but a real ISO 639-3 code + real script
])
def test_accepted_spellings(spelling: str, tag: str) -> None:
    assert L.canonical_tag(spelling) == tag


@pytest.mark.parametrize(("code", "suggested"), [
    ("swh_Latin", "swh_Latn"), ("swahil", "swh_Latn"), ("engl_Latn", "eng_Latn"),
])
def test_unknown_codes_suggest_closest(code: str, suggested: str) -> None:
    with pytest.raises(L.UnknownLanguageError) as info:
        L.canonical_tag(code)
    message = str(info.value)
    assert f"unknown language tag {code!r}" in message
    assert suggested in message.split("closest known:")[1]


@pytest.mark.parametrize("code", ["", "xx", "xyz_Latn", "swh_Abcd", "qaa_Latn", "12"])
def test_invalid_codes_rejected(code: str) -> None:
    with pytest.raises(L.UnknownLanguageError):
        L.canonical_tag(code)


def test_every_belebele_language_is_known() -> None:
    folder = Path(lm_eval.__file__).parent / "tasks" / "belebele"
    from_tasks = {p.stem.removeprefix("belebele_") for p in folder.glob("belebele_*.yaml")}
    assert len(from_tasks) == 122
    assert from_tasks == set(L.belebele_tags())
    for tag in from_tasks:
        assert L.canonical_tag(tag) == tag
        assert L.tasks_for(tag)["belebele"] == f"belebele_{tag}"


def test_every_culturax_language_maps_to_a_distinct_tag() -> None:
    codes = L.culturax_codes()
    tags = [L.culturax_tag(c) for c in codes]
    assert len(set(tags)) == len(codes) >= 167
    for code, tag in zip(codes, tags, strict=True):
        assert tag in L.known_tags()
        assert L.culturax_code(tag) == code
    assert L.culturax_tag("als") == "gsw_Latn"  # Wikipedia's code for Alemannic
    assert L.culturax_code("swh_Latn") == "sw"


def test_language_records() -> None:
    lang = L.get_language("sw")
    assert (lang.tag, lang.iso639_3, lang.script, lang.iso639_1) == \
        ("swh_Latn", "swh", "Latn", "sw")
    assert "Swahili" in lang.name
    assert L.tasks_for("swh_Latn")["xnli"] == "xnli_sw"
    assert L.tasks_for("jpn_Jpan")["xwinograd"] == "xwinograd_jp"
    assert "rus_Cyrl" in L.languages_with_task("mgsm")
    with pytest.raises(KeyError, match="unknown benchmark"):
        L.languages_with_task("nope")


def test_every_task_name_exists_in_lm_eval() -> None:
    from lm_eval.tasks import TaskManager

    available = set(TaskManager().all_tasks)
    names = {task for tag in L.known_tags() for task in L.tasks_for(tag).values()}
    assert len(names) > 300
    missing = sorted(names - available)
    assert missing == []
