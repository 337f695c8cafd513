"""GET /v1/relations: the Wikidata relation ids a fact may use, with their prompt templates."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from contract.relations import RELATIONS

router = APIRouter(tags=["relations"])


class Relation(BaseModel):
    id: str
    template: str


class RelationList(BaseModel):
    relations: list[Relation]


@router.get("/v1/relations", response_model=RelationList)
def list_relations() -> RelationList:
    """The built-in CounterFact relations: `{"relation": "P36"}` becomes its template."""
    ordered = sorted(RELATIONS.items(), key=lambda item: int(item[0][1:]))
    return RelationList(relations=[Relation(id=i, template=t) for i, t in ordered])
