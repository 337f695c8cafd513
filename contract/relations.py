"""CounterFact relations: Wikidata property ids and the prompt templates they stand for.

A fact may name its relation by id (`"relation": "P36"`); `contract.facts` replaces the id with
the template, where `{}` marks the subject, wherever facts are read (engine, CLI, API, bench). The
templates are CounterFact's (ROME, Meng et al. 2022).
"""

from __future__ import annotations

import re

RELATION_ID_RE = re.compile(r"P[1-9][0-9]*")

RELATIONS: dict[str, str] = {
    "P17": "{} is located in the country of",
    "P19": "{} was born in",
    "P27": "{} is a citizen of",
    "P30": "{} is located in the continent of",
    "P36": "The capital of {} is",
    "P37": "The official language of {} is",
    "P39": "{} holds the position of",
    "P101": "{} works in the field of",
    "P103": "The mother tongue of {} is",
    "P106": "{} works as a",
    "P108": "{} works for",
    "P127": "{} is owned by",
    "P131": "{} is located in",
    "P136": "{} plays",
    "P138": "{} is named after",
    "P140": "{} is affiliated with the religion",
    "P159": "The headquarters of {} are in",
    "P176": "{} is produced by",
    "P178": "{} was developed by",
    "P190": "{} is a twin city of",
    "P264": "{} is represented by the record label",
    "P276": "{} is located in",
    "P413": "{} plays in the position of",
    "P449": "{} was originally aired on",
    "P463": "{} is a member of",
    "P495": "{} was created in the country of",
    "P641": "{} plays the sport of",
    "P740": "{} was founded in",
    "P937": "{} worked in the city of",
    "P1303": "{} plays the",
    "P1412": "{} speaks the language",
}


def is_relation_id(relation: str) -> bool:
    """Whether `relation` has the form of a Wikidata property id (P followed by digits)."""
    return bool(RELATION_ID_RE.fullmatch(relation.strip()))
