import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from contract.facts import (
    MAX_FACT_TOKENS,
    MAX_PROMPT_CHARS,
    ControlCharacter,
    Fact,
    FactsError,
    FactTooLong,
    Neighbor,
    UnknownRelation,
    fact_from_record,
    fact_to_record,
    facts_digest,
    load_facts,
    parse_facts,
)
from contract.relations import RELATIONS

ASSETS = Path(__file__).resolve().parents[2] / "crispedit" / "assets"
COUNTERFACT = ASSETS / "counterfact-edit-1k.json"
ZSRE = ASSETS / "zsre_mend_train-1k.json"

# the bundled zsRE sample holds two records whose new object ("alt") is empty
ZSRE_EMPTY_ALT = (534, 723)

EIFFEL = {
    "subject": "Eiffel Tower",
    "prompt": "The Eiffel Tower is located in",
    "target": "Rome",
    "paraphrases": ["Where is the Eiffel Tower? It is in"],
    "neighbors": [{"prompt": "The Colosseum is located in", "target": "Rome"}],
    "ground_truth": "Paris",
}
EIFFEL_FACT = Fact(
    prompt="The Eiffel Tower is located in",
    target="Rome",
    subject="Eiffel Tower",
    paraphrases=("Where is the Eiffel Tower? It is in",),
    neighbors=(Neighbor("The Colosseum is located in", "Rome"),),
    ground_truth="Paris",
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(record: dict) -> str:
    with pytest.raises(FactsError) as info:
        fact_from_record(record, "facts.json: record 3")
    return str(info.value)


# -----------------------------------------------------------------------------
# the real data files


def test_counterfact_file_loads_all_records_with_their_fields():
    facts = load_facts(COUNTERFACT)
    assert len(facts) == 1000
    assert all(isinstance(f, Fact) for f in facts)
    assert facts[0] == Fact(
        prompt="David Robinson professionally plays the sport",
        target="baseball",
        subject="David Robinson",
        paraphrases=("David Robinson's greatest weakness is",),
        neighbors=(Neighbor("Shaquille O'Neal plays", "basketball"),),
        ground_truth="basketball",
    )
    assert all(len(f.paraphrases) == 1 and len(f.neighbors) == 1 for f in facts)
    assert all(f.subject and f.ground_truth for f in facts)


def test_counterfact_file_matches_its_raw_records():
    raw = json.loads(COUNTERFACT.read_text(encoding="utf-8"))
    for record, fact in zip(raw, load_facts(COUNTERFACT), strict=True):
        assert fact.prompt == record["prompt"]
        assert fact.target == record["target_new"]
        assert fact.neighbors[0].target == record["locality_ground_truth"]


def test_zsre_file_maps_the_first_record():
    fact = load_facts(ZSRE, limit=1)[0]
    assert fact == Fact(
        prompt="What is the product made by UniFirst?",
        target="unmanned aircraft",
        subject="UniFirst",
        paraphrases=("What will be the product of UniFirst?",),
        neighbors=(
            Neighbor("nq question: john goodman's character in the big lebowski", "Walter Sobchak"),
        ),
        ground_truth="uniform",
    )


def test_zsre_file_loads_every_record_except_the_two_with_an_empty_target():
    raw = json.loads(ZSRE.read_text(encoding="utf-8"))
    assert len(raw) == 1000
    assert [i for i, r in enumerate(raw) if not r["alt"].strip()] == list(ZSRE_EMPTY_ALT)
    good = [r for i, r in enumerate(raw) if i not in ZSRE_EMPTY_ALT]
    facts = parse_facts(good, "zsre")
    assert len(facts) == 998
    # the ground truth is the data set's answer, not the model's old prediction ("pred")
    assert raw[2]["answers"][0] != raw[2]["pred"]
    assert facts[2].ground_truth == raw[2]["answers"][0] == "1987"
    # some objects carry a leading space in the file
    assert raw[174]["alt"] == " Captain Universe"
    assert facts[174].target == "Captain Universe"


def test_zsre_file_stops_at_its_first_bad_record():
    with pytest.raises(FactsError) as info:
        load_facts(ZSRE)
    assert str(info.value) == f"{ZSRE}: record 534: field 'alt': must be a non-empty string"
    assert len(load_facts(ZSRE, limit=534)) == 534


# -----------------------------------------------------------------------------
# CounterFact and zsRE records


def counterfact(**changes) -> dict:
    record = {
        "case_id": 1,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux, a native",
        "locality_prompt": "The mother tongue of Léon Blum is",
        "locality_ground_truth": "French",
    }
    return {**record, **changes}


def zsre(**changes) -> dict:
    record = {
        "subject": "Watts Humphrey",
        "src": "What university did Watts Humphrey attend?",
        "pred": "Illinois Institute of Technology",
        "rephrase": "What university did Watts Humphrey take part in?",
        "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
        "cond": "ignored",
    }
    return {**record, **changes}


def test_counterfact_accepts_lists_for_rephrase_locality_and_ground_truth():
    fact = fact_from_record(
        counterfact(
            rephrase_prompt=["Danielle Darrieux speaks", "Danielle Darrieux was raised in "],
            locality_prompt=["Léon Blum speaks", "Jean Gabin speaks"],
            locality_ground_truth=["French", " French "],
            ground_truth=["French", "Occitan"],
        )
    )
    assert fact.paraphrases == ("Danielle Darrieux speaks", "Danielle Darrieux was raised in")
    assert fact.neighbors == (
        Neighbor("Léon Blum speaks", "French"),
        Neighbor("Jean Gabin speaks", "French"),
    )
    assert fact.ground_truth == "French"


def test_counterfact_without_optional_fields():
    record = {"prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English"}
    fact = fact_from_record(record)
    assert fact == Fact("The mother tongue of Danielle Darrieux is", "English")


def test_counterfact_locality_lengths_must_match():
    message = error_of(counterfact(locality_prompt=["a is", "b is"], locality_ground_truth=["x"]))
    assert "record 3: field 'locality_ground_truth'" in message
    assert "1 answers for the 2 prompts" in message


def test_counterfact_errors_name_its_own_fields():
    assert "field 'target_new': must be a non-empty string" in error_of(counterfact(target_new=""))
    assert "field 'prompt': is missing" in error_of(counterfact(prompt=None))
    assert "field 'rephrase_prompt[1]'" in error_of(counterfact(rephrase_prompt=["ok", 7]))
    assert "field 'locality_prompt'" in error_of(counterfact(locality_prompt={"p": "x"}))


def test_counterfact_is_recognised_by_target_new_even_with_a_target_key():
    fact = fact_from_record(counterfact(target="ignored"))
    assert fact.target == "English"


def test_zsre_ground_truth_falls_back_to_pred():
    assert fact_from_record(zsre(answers=[])).ground_truth == "Illinois Institute of Technology"
    record = zsre(pred="Harvard")
    del record["answers"]
    assert fact_from_record(record).ground_truth == "Harvard"
    del record["pred"]
    assert fact_from_record(record).ground_truth is None


def test_zsre_takes_the_first_of_several_answers_and_accepts_rephrase_lists():
    fact = fact_from_record(zsre(answers=["A", "B"], rephrase=["One?", "Two? "]))
    assert fact.ground_truth == "A"
    assert fact.paraphrases == ("One?", "Two?")


def test_zsre_errors_name_its_own_fields():
    assert "record 3: field 'alt': must be a non-empty string" in error_of(zsre(alt="  "))
    assert "field 'src': must be a non-empty string, got int" in error_of(zsre(src=5))
    assert "field 'loc_ans'" in error_of(zsre(loc_ans=None))
    assert "field 'answers[0]'" in error_of(zsre(answers=[None]))


def test_src_without_alt_is_read_as_our_format():
    record = {"src": "What university did Watts Humphrey attend?", "target": "Yale"}
    assert "field 'prompt': is missing" in error_of(record)


# -----------------------------------------------------------------------------
# our own format


def test_own_format_with_every_field():
    assert fact_from_record(EIFFEL) == EIFFEL_FACT


def test_own_format_minimal_and_unknown_keys_ignored():
    record = {"prompt": "The Eiffel Tower is located in", "target": "Rome", "id": 7, "x": [1]}
    assert fact_from_record(record) == Fact("The Eiffel Tower is located in", "Rome")


def test_prompt_loses_trailing_whitespace_and_target_all_of_it():
    fact = fact_from_record({"prompt": "  The Eiffel Tower is located in \n", "target": " Rome\t"})
    assert fact.prompt == "  The Eiffel Tower is located in"
    assert fact.target == "Rome"


def test_object_is_an_alias_for_target():
    fact = fact_from_record({"prompt": "The Eiffel Tower is located in", "object": "Rome"})
    assert fact.target == "Rome"


def test_relation_template_puts_the_subject_in_place():
    record = {"subject": "Eiffel Tower", "relation": "The {} is located in ", "target": "Rome"}
    assert fact_from_record(record).prompt == "The Eiffel Tower is located in"


def test_relation_template_may_use_the_subject_twice_and_keep_other_braces():
    record = {"subject": "X", "relation": "{} {x} and {}", "target": "Y"}
    assert fact_from_record(record).prompt == "X {x} and X"


def test_relation_phrase_follows_the_subject():
    record = {"subject": "Eiffel Tower", "relation": " is located in", "target": "Rome"}
    fact = fact_from_record(record)
    assert fact.prompt == "Eiffel Tower is located in"
    assert fact.subject == "Eiffel Tower"


def test_relation_id_is_replaced_by_its_template():
    record = {"subject": "The Eiffel Tower", "relation": " P17 ", "target": "Italy"}
    fact = fact_from_record(record)
    assert fact.prompt == "The Eiffel Tower is located in the country of"
    assert fact.prompt == RELATIONS["P17"].replace("{}", "The Eiffel Tower")


def test_every_relation_id_expands_around_its_subject():
    for relation, template in RELATIONS.items():
        fact = fact_from_record({"subject": "S", "relation": relation, "target": "T"})
        before, _, after = template.partition("{}")
        assert fact.prompt == (before + "S" + after).rstrip(), relation


def test_unknown_relation_id_names_the_field():
    with pytest.raises(UnknownRelation) as caught:
        parse_facts([EIFFEL, {"subject": "S", "relation": "P9999", "target": "T"}], "facts.json")
    assert isinstance(caught.value, FactsError)
    assert str(caught.value).startswith("facts.json: record 1: field 'relation': unknown relation")
    assert "'P9999'" in str(caught.value)


def test_a_phrase_that_only_starts_like_an_id_is_a_phrase():
    fact = fact_from_record({"subject": "S", "relation": "P17 is near", "target": "T"})
    assert fact.prompt == "S P17 is near"


@pytest.mark.parametrize("relation", ["{} is located in", "is located in"])
def test_relation_requires_a_subject(relation):
    message = error_of({"relation": relation, "target": "Rome"})
    assert message.startswith("facts.json: record 3: field 'subject': is required")


def test_prompt_and_relation_together_are_ambiguous():
    record = {"subject": "S", "prompt": "S is in", "relation": "{} is in", "target": "Rome"}
    message = error_of(record)
    assert "field 'prompt': give either 'prompt' or 'relation'" in message


def test_target_and_object_together_are_ambiguous():
    message = error_of({"prompt": "P", "target": "Rome", "object": "Paris"})
    assert "field 'target': give either 'target' or 'object'" in message


def test_neighbors_as_objects_or_pairs():
    record = {
        "prompt": "P",
        "target": "T",
        "neighbors": [{"prompt": "A is ", "target": " a"}, ["B is", "b"], ("C is", "c")],
    }
    assert fact_from_record(record).neighbors == (
        Neighbor("A is", "a"),
        Neighbor("B is", "b"),
        Neighbor("C is", "c"),
    )


def test_a_single_paraphrase_string_is_accepted():
    record = {"prompt": "P", "target": "T", "paraphrases": "Q "}
    assert fact_from_record(record).paraphrases == ("Q",)


def test_null_optional_fields_mean_absent():
    record = {"prompt": "P", "target": "T", "subject": None, "paraphrases": None}
    record |= {"neighbors": None, "ground_truth": None}
    assert fact_from_record(record) == Fact("P", "T")


# -----------------------------------------------------------------------------
# validation of our format: every message names the record and the field


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"target": "Rome"}, "field 'prompt': is missing"),
        ({"prompt": "P"}, "field 'target': is missing"),
        ({"prompt": "", "target": "Rome"}, "field 'prompt': must be a non-empty string"),
        ({"prompt": " \n\t", "target": "Rome"}, "field 'prompt': must be a non-empty string"),
        ({"prompt": "P", "target": ""}, "field 'target': must be a non-empty string"),
        ({"prompt": "P", "target": "   "}, "field 'target': must be a non-empty string"),
        ({"prompt": "P", "object": " "}, "field 'object': must be a non-empty string"),
        ({"prompt": 3, "target": "Rome"}, "field 'prompt': must be a non-empty string, got int"),
        (
            {"prompt": "P", "target": ["Rome"]},
            "field 'target': must be a non-empty string, got list",
        ),
        ({"prompt": "P", "target": True}, "field 'target': must be a non-empty string, got bool"),
        ({"prompt": "P", "target": "T", "subject": 1}, "field 'subject': must be a non-empty"),
        ({"prompt": "P", "target": "T", "subject": ""}, "field 'subject': must be a non-empty"),
        ({"subject": "S", "relation": 5, "target": "T"}, "field 'relation': must be a non-empty"),
        ({"subject": "S", "relation": " ", "target": "T"}, "field 'relation': must be a non-empty"),
        ({"prompt": "P", "target": "T", "ground_truth": 2}, "field 'ground_truth': must be"),
        (
            {"prompt": "P", "target": "T", "paraphrases": 5},
            "field 'paraphrases': must be a string or a list of strings, got int",
        ),
        (
            {"prompt": "P", "target": "T", "paraphrases": {"a": "b"}},
            "field 'paraphrases': must be a string or a list of strings, got dict",
        ),
        (
            {"prompt": "P", "target": "T", "paraphrases": ["ok", 7]},
            "field 'paraphrases[1]': must be a non-empty string, got int",
        ),
        (
            {"prompt": "P", "target": "T", "paraphrases": ["ok", " "]},
            "field 'paraphrases[1]': must be a non-empty string",
        ),
        (
            {"prompt": "P", "target": "T", "neighbors": "A is a"},
            "field 'neighbors': must be a list, got str",
        ),
        (
            {"prompt": "P", "target": "T", "neighbors": {"prompt": "A", "target": "a"}},
            "field 'neighbors': must be a list, got dict",
        ),
        ({"prompt": "P", "target": "T", "neighbors": ["A is a"]}, "field 'neighbors[0]': must be"),
        ({"prompt": "P", "target": "T", "neighbors": [["A", "a", "x"]]}, "field 'neighbors[0]'"),
        (
            {"prompt": "P", "target": "T", "neighbors": [["A", "a"], {"prompt": "B"}]},
            "field 'neighbors[1].target': is missing",
        ),
        (
            {"prompt": "P", "target": "T", "neighbors": [{"prompt": "", "target": "b"}]},
            "field 'neighbors[0].prompt': must be a non-empty string",
        ),
        (
            {"prompt": "P", "target": "T", "neighbors": [["A", 1]]},
            "field 'neighbors[0][1]': must be a non-empty string, got int",
        ),
    ],
)
def test_bad_fields_are_named(record, expected):
    message = error_of(record)
    assert message.startswith("facts.json: record 3: ")
    assert expected in message


@pytest.mark.parametrize("record", [["P", "T"], "P T", 7, None])
def test_a_record_must_be_an_object(record):
    with pytest.raises(FactsError, match=r"^facts\.json: record 3: must be a JSON object"):
        fact_from_record(record, "facts.json: record 3")


def test_facts_error_is_a_value_error():
    with pytest.raises(ValueError):
        fact_from_record({"prompt": "P"})


# -----------------------------------------------------------------------------
# parse_facts


def test_parse_facts_keeps_order_and_names_the_bad_record():
    good = {"prompt": "P", "target": "T"}
    assert [f.target for f in parse_facts([good, {**good, "target": "U"}])] == ["T", "U"]
    with pytest.raises(FactsError) as info:
        parse_facts([good, good, {"prompt": "P", "target": ""}, 5], "facts.json")
    assert str(info.value) == "facts.json: record 2: field 'target': must be a non-empty string"


def test_parse_facts_mixes_formats():
    facts = parse_facts([EIFFEL, counterfact(), zsre()])
    assert [f.target for f in facts] == ["Rome", "English", "University of Michigan"]


def test_parse_facts_rejects_no_facts_and_non_lists():
    with pytest.raises(FactsError, match=r"^facts\.json: no facts$"):
        parse_facts([], "facts.json")
    with pytest.raises(FactsError, match="expected a list of fact records, got dict"):
        parse_facts(EIFFEL, "facts.json")


# -----------------------------------------------------------------------------
# load_facts: .json


def test_json_list(tmp_path):
    path = write(tmp_path / "facts.json", json.dumps([EIFFEL, {"prompt": "P", "target": "T"}]))
    assert load_facts(path) == [EIFFEL_FACT, Fact("P", "T")]
    assert load_facts(str(path)) == load_facts(path)


def test_json_single_object_is_one_record(tmp_path):
    path = write(tmp_path / "one.json", json.dumps(EIFFEL))
    assert load_facts(path) == [EIFFEL_FACT]


def test_json_object_with_a_facts_list(tmp_path):
    path = write(tmp_path / "wrapped.json", json.dumps({"version": 2, "facts": [EIFFEL, EIFFEL]}))
    assert load_facts(path) == [EIFFEL_FACT, EIFFEL_FACT]


def test_json_errors_name_the_file_and_record(tmp_path):
    records = [EIFFEL, EIFFEL, EIFFEL, {"prompt": "P", "target": 4}]
    path = write(tmp_path / "facts.json", json.dumps(records))
    with pytest.raises(FactsError) as info:
        load_facts(path)
    assert str(info.value) == (
        f"{path}: record 3: field 'target': must be a non-empty string, got int"
    )


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path / "facts.json", '[\n  {"prompt": "P", "target": "T"},\n  {"prompt": ]\n')
    with pytest.raises(FactsError) as info:
        load_facts(path)
    assert str(info.value).startswith(f"{path}: invalid JSON at line 3, column 14")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[]", "no facts"),
        ('{"facts": []}', "no facts"),
        ("", "no facts"),
        ("  \n", "no facts"),
        ("42", "expected a list of fact records, got int"),
        ('"facts"', "expected a list of fact records, got str"),
        ('{"facts": {"prompt": "P"}}', "expected a list of fact records, got dict"),
    ],
)
def test_json_without_records(tmp_path, text, expected):
    path = write(tmp_path / "facts.json", text)
    with pytest.raises(FactsError) as info:
        load_facts(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FactsError) as info:
        load_facts(path)
    assert str(info.value) == f"file not found: {path}"


def test_directory_is_not_a_file(tmp_path):
    path = tmp_path / "dir.json"
    path.mkdir()
    with pytest.raises(FactsError, match="not a file"):
        load_facts(path)


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"prompt": "Café is in", "target": "T"}]'.encode("latin-1"))
    with pytest.raises(FactsError) as info:
        load_facts(path)
    assert str(info.value) == f"{path}: not UTF-8 text (invalid byte at offset 16)"


def test_utf8_with_byte_order_mark_and_non_ascii_text(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps([{"prompt": "Café is in", "target": "Zürich"}]).encode()
    )
    assert load_facts(path) == [Fact("Café is in", "Zürich")]


@pytest.mark.parametrize("name", ["facts.txt", "facts.csv", "facts"])
def test_unknown_extension(tmp_path, name):
    path = write(tmp_path / name, json.dumps([EIFFEL]))
    with pytest.raises(FactsError, match=r"expected \.json or \.jsonl"):
        load_facts(path)


def test_extension_is_case_insensitive(tmp_path):
    assert load_facts(write(tmp_path / "FACTS.JSON", json.dumps([EIFFEL]))) == [EIFFEL_FACT]


# -----------------------------------------------------------------------------
# load_facts: .jsonl


def test_jsonl_skips_blank_lines(tmp_path):
    lines = [json.dumps(EIFFEL), "", "   ", json.dumps(counterfact()), json.dumps(zsre()), ""]
    facts = load_facts(write(tmp_path / "facts.jsonl", "\n".join(lines)))
    assert [f.target for f in facts] == ["Rome", "English", "University of Michigan"]


def test_jsonl_accepts_windows_line_ends(tmp_path):
    text = json.dumps(EIFFEL) + "\r\n" + json.dumps(EIFFEL) + "\r\n"
    assert load_facts(write(tmp_path / "facts.jsonl", text)) == [EIFFEL_FACT, EIFFEL_FACT]


def test_jsonl_keeps_line_separator_characters_inside_strings(tmp_path):
    record = {"prompt": "A\u2028B is", "target": "C"}
    text = json.dumps(record, ensure_ascii=False) + "\n"
    assert "\u2028" in text
    assert load_facts(write(tmp_path / "facts.jsonl", text)) == [Fact("A\u2028B is", "C")]


def test_jsonl_syntax_error_names_the_line(tmp_path):
    text = json.dumps(EIFFEL) + "\n\n" + json.dumps(EIFFEL) + "\n" + '{"prompt": "P", \n'
    path = write(tmp_path / "facts.jsonl", text)
    with pytest.raises(FactsError) as info:
        load_facts(path)
    assert str(info.value).startswith(f"{path}: line 4: invalid JSON at column")


def test_jsonl_bad_record_names_the_line_and_field(tmp_path):
    text = json.dumps(EIFFEL) + "\n\n" + json.dumps({"prompt": "P"}) + "\n"
    path = write(tmp_path / "facts.jsonl", text)
    with pytest.raises(FactsError) as info:
        load_facts(path)
    assert str(info.value) == f"{path}: line 3: field 'target': is missing"


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "facts.jsonl", json.dumps(EIFFEL) + "\n[1, 2]\n")
    with pytest.raises(FactsError, match=r"line 2: must be a JSON object, got list"):
        load_facts(path)


@pytest.mark.parametrize("text", ["", "\n\n", "  \n \n"])
def test_jsonl_without_records(tmp_path, text):
    path = write(tmp_path / "facts.jsonl", text)
    with pytest.raises(FactsError, match="no facts"):
        load_facts(path)


# -----------------------------------------------------------------------------
# limit


def test_limit_keeps_the_first_facts():
    assert load_facts(COUNTERFACT, limit=3) == load_facts(COUNTERFACT)[:3]
    assert len(load_facts(COUNTERFACT, limit=5000)) == 1000


def test_limit_stops_before_later_bad_records(tmp_path):
    records = [EIFFEL, {"prompt": "P", "target": "T"}, {"prompt": "broken"}]
    path = write(tmp_path / "facts.json", json.dumps(records))
    assert load_facts(path, limit=2) == [EIFFEL_FACT, Fact("P", "T")]
    with pytest.raises(FactsError, match="record 2"):
        load_facts(path, limit=3)


def test_limit_in_jsonl_does_not_read_past_the_last_kept_line(tmp_path):
    text = json.dumps(EIFFEL) + "\n\n" + json.dumps(EIFFEL) + "\nnot json at all\n"
    path = write(tmp_path / "facts.jsonl", text)
    assert load_facts(path, limit=2) == [EIFFEL_FACT, EIFFEL_FACT]
    with pytest.raises(FactsError, match="line 4: invalid JSON"):
        load_facts(path, limit=3)


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(limit):
    with pytest.raises(ValueError, match="limit must be a positive"):
        load_facts(COUNTERFACT, limit=limit)


# -----------------------------------------------------------------------------
# fact_to_record and facts_digest


def test_fact_to_record_is_our_canonical_form():
    assert fact_to_record(EIFFEL_FACT) == EIFFEL
    assert fact_to_record(Fact("P", "T")) == {
        "prompt": "P",
        "target": "T",
        "subject": None,
        "paraphrases": [],
        "neighbors": [],
        "ground_truth": None,
    }


def test_round_trip_through_records_for_every_real_fact():
    facts = load_facts(COUNTERFACT) + load_facts(ZSRE, limit=534) + [Fact("P", "T")]
    again = [fact_from_record(json.loads(json.dumps(fact_to_record(f)))) for f in facts]
    assert again == facts


def test_round_trip_through_a_jsonl_file(tmp_path):
    facts = load_facts(COUNTERFACT, limit=50)
    lines = [json.dumps(fact_to_record(f), ensure_ascii=False) for f in facts]
    path = write(tmp_path / "out.jsonl", "\n".join(lines) + "\n")
    assert load_facts(path) == facts
    assert facts_digest(load_facts(path)) == facts_digest(facts)


def test_digest_is_pinned():
    # fixed values: a change here breaks every digest recorded by earlier runs
    assert facts_digest([EIFFEL_FACT]) == (
        "24c3af55cfd8b3d423c8ae94966a2b9c02f8d41be982b0185835e95353e33d19"
    )
    assert facts_digest([Fact("Ä prompt", "ö")]) == (
        "db3906e9037e73590eda40ffacd7a7ed5bcb4d0216b20318e3862783d369e382"
    )
    assert facts_digest(load_facts(COUNTERFACT)) == (
        "87cdaeff6a26804e35e8bc0faadfb568600cdcdcb20f8bd1933cfe3d8253aae2"
    )


def test_digest_is_sha256_of_the_canonical_json():
    facts = [EIFFEL_FACT, Fact("Ä prompt", "ö")]
    canonical = (
        '[{"ground_truth":"Paris","neighbors":[{"prompt":"The Colosseum is located in",'
        '"target":"Rome"}],"paraphrases":["Where is the Eiffel Tower? It is in"],'
        '"prompt":"The Eiffel Tower is located in","subject":"Eiffel Tower","target":"Rome"},'
        '{"ground_truth":null,"neighbors":[],"paraphrases":[],"prompt":"Ä prompt",'
        '"subject":null,"target":"ö"}]'
    )
    assert facts_digest(facts) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_digest_is_the_same_for_equal_facts_from_different_sources():
    record = {"subject": "Eiffel Tower", "relation": "The {} is located in", "target": " Rome"}
    ours = parse_facts([record])
    plain = [Fact("The Eiffel Tower is located in", "Rome", subject="Eiffel Tower")]
    assert ours == plain
    assert facts_digest(ours) == facts_digest(plain)
    assert facts_digest(tuple(plain)) == facts_digest(plain)


def test_digest_depends_on_order_and_every_field():
    a, b = Fact("P", "T"), Fact("Q", "U")
    assert facts_digest([a, b]) != facts_digest([b, a])
    assert facts_digest([a]) != facts_digest([a, a])
    base = facts_digest([EIFFEL_FACT])
    changes = [
        {"prompt": "The Eiffel Tower is in"},
        {"target": "Roma"},
        {"subject": None},
        {"paraphrases": ()},
        {"neighbors": (Neighbor("The Colosseum is located in", "Paris"),)},
        {"ground_truth": None},
    ]
    digests = {facts_digest([dataclasses.replace(EIFFEL_FACT, **c)]) for c in changes}
    assert len(digests) == len(changes)
    assert base not in digests


def test_digest_of_no_facts_is_defined():
    assert facts_digest([]) == hashlib.sha256(b"[]").hexdigest()


def test_facts_are_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EIFFEL_FACT.target = "Paris"  # type: ignore[misc]
    assert len({EIFFEL_FACT, fact_from_record(EIFFEL)}) == 1


# --- size limits: the expanded prompt and the bytes (>= tokens) of each sequence ---------------


def test_a_template_cannot_multiply_the_prompt_past_the_limit():
    # 1,000 holes filled with a 2,000-character subject: 2,000,000 characters, if built
    record = {"subject": "s" * 2000, "relation": "{}" * 1000, "target": "t"}
    with pytest.raises(FactTooLong, match=r"record: field 'relation': makes a prompt of 2000000"):
        fact_from_record(record)
    fits = {"subject": "s" * 999, "relation": "{} {}", "target": "t"}
    assert len(fact_from_record(fits).prompt) == 1999
    with pytest.raises(FactTooLong, match="field 'relation'"):
        fact_from_record({**fits, "subject": "s" * 1000, "relation": "{}, {}"})
    with pytest.raises(FactTooLong, match="field 'relation'"):  # a phrase follows the subject
        fact_from_record({"subject": "s" * 1990, "relation": "is located in", "target": "t"})


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"prompt": "p" * (MAX_PROMPT_CHARS + 1), "target": "t"}, "prompt"),
        ({"prompt": "p", "target_new": "t", "subject": "s" * 3000}, None),
        ({"src": "p" * (MAX_PROMPT_CHARS + 1), "alt": "t"}, "src"),
    ],
)
def test_a_literal_prompt_over_the_limit_is_refused_in_every_format(record, field):
    if field is None:  # CounterFact's subject is not in the prompt: nothing to refuse
        assert fact_from_record(record).subject == "s" * 3000
        return
    with pytest.raises(FactTooLong, match=f"field '{field}'"):
        fact_from_record(record)


def test_each_sequence_is_bounded_in_utf8_bytes():
    half = MAX_FACT_TOKENS // 2
    # 4-byte characters: 700 of them are within the character limit but 2,800 bytes
    with pytest.raises(FactTooLong, match=r"field 'prompt': makes a sequence of 2802 UTF-8 bytes"):
        fact_from_record({"prompt": "\U0001f600" * 700, "target": "t"})
    with pytest.raises(FactTooLong, match="field 'target'"):
        fact_from_record({"prompt": "p", "target": "t" * MAX_FACT_TOKENS})
    with pytest.raises(FactTooLong, match=r"field 'paraphrases\[1\]'"):
        fact_from_record({"prompt": "p", "target": "t" * half, "paraphrases": ["a", "b" * half]})
    with pytest.raises(FactTooLong, match=r"field 'neighbors\[0\]'"):
        fact_from_record({"prompt": "p", "target": "t", "neighbors": [["n" * half, "m" * half]]})
    with pytest.raises(FactTooLong, match=r"field 'locality_prompt\[0\]'"):
        fact_from_record({"prompt": "p", "target_new": "t", "locality_prompt": "n" * half,
                          "locality_ground_truth": "m" * half})  # fmt: skip
    exact = {"prompt": "p" * (MAX_FACT_TOKENS - 2), "target": "t"}  # 2048 bytes with the space
    with pytest.raises(FactTooLong):
        fact_from_record(exact)  # MAX_PROMPT_CHARS first
    exact = {"prompt": "p" * 1000, "target": "t" * (MAX_FACT_TOKENS - 1001)}
    assert fact_from_record(exact).target == "t" * (MAX_FACT_TOKENS - 1001)
    with pytest.raises(FactTooLong):
        fact_from_record({**exact, "target": exact["target"] + "t"})


def test_the_byte_bound_is_a_token_bound_for_a_byte_level_tokenizer(tiny_tokenizer):
    # the worst cases for a BPE: text its merges never saw, emoji, combining marks, CJK
    texts = ["\U0001f600" * 50, "e\u0301" * 100, "漢字" * 100, "Zq" * 300, "{}" * 500]
    for text in texts:
        tokens = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert 0 < len(tokens) <= len(text.encode("utf-8"))


# --- control characters in what defines an edit ------------------------------------------------


@pytest.mark.parametrize(
    "char",
    [
        "\x00",
        "\x1b",
        "\x7f",
        "\u200b",
        "\u200d",
        "\u202e",
        "\u2066",
        "\ufeff",
        "\ud800",
    ],
)
@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"subject": "Paris{c}", "relation": "P17", "target": "Italy"}, "subject"),
        ({"subject": "Paris", "relation": "{} is in{c}", "target": "Italy"}, "relation"),
        ({"prompt": "Paris is in{c} the", "target": "Italy"}, "prompt"),
        ({"prompt": "Paris is in", "target": "{c}"}, "target"),
        ({"prompt": "Paris is in", "object": "It{c}aly"}, "object"),
        ({"prompt": "Paris is in", "target_new": "Italy{c}"}, "target_new"),
        ({"src": "Where is{c} Paris?", "alt": "Italy"}, "src"),
        ({"src": "Where is Paris?", "alt": "Italy", "subject": "{c}Paris"}, "subject"),
    ],
)
def test_control_characters_are_refused_naming_the_field(char, record, field):
    record = {key: value.replace("{c}", char) for key, value in record.items()}
    with pytest.raises(
        ControlCharacter, match=rf"record: field '{field}': holds U\+{ord(char):04X}"
    ):
        fact_from_record(record)


def test_tab_newline_and_visible_unicode_are_kept():
    fact = fact_from_record({"prompt": "Q:\tMünchen\nliegt in", "target": "Bayern 🍺 é"})
    assert (fact.prompt, fact.target) == ("Q:\tMünchen\nliegt in", "Bayern 🍺 é")
    # neighbours and ground truths are data-set text, not the edit: zsRE carries BOMs there
    record = {"prompt": "p", "target": "t", "neighbors": [["n\ufeff", "m\ufeff"]]}
    assert fact_from_record(record).neighbors[0].target == "m\ufeff"
