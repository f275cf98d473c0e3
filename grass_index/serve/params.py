"""What a request may ask for, as pydantic models and FastAPI parameter types: the limits a
server was started with (``Limits``), the fields of a POSTed query (``QueryFields``, for a JSON
body and for multipart form fields alike), and the fix to show for each parameter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

Split = Literal["query", "train"]
PAGE_LIMIT = 500  # rows per page of /api/examples and /api/self-influence


@dataclass(frozen=True)
class Limits:
    """Bounds on one request (``/api/info`` reports them)."""

    max_k: int = 100        # results per direction
    max_items: int = 64     # examples per request
    max_body: int = 8 << 20  # bytes of request body
    max_text: int = 10_000  # characters of query text

    def fixes(self) -> dict:
        """How to fix each parameter, for validation errors."""
        return dict(k=f"k must be between 1 and {self.max_k}",
                    example="give an example number (see GET /api/examples)",
                    split="use split=query or split=train",
                    offset="offset counts rows from 0",
                    limit=f"limit must be between 1 and {PAGE_LIMIT}",
                    text='send {"text": "..."}',
                    train_id="give a training id (see GET /api/examples?split=train)")


class QueryFields(BaseModel):
    """A POSTed query: ``text`` or ``example``, and what to return. The same fields arrive
    as a JSON object or as multipart form fields beside an uploaded file."""

    model_config = ConfigDict(extra="forbid")

    text: Optional[str] = Field(None, description="text for the task's encode(text)")
    example: Optional[int] = Field(None, ge=0, description="an example id of `split`")
    split: Split = Field("query", description="where `example` comes from")
    k: int = Field(10, ge=1, description="results per direction (at most the server's max_k)")
    opponents: bool = Field(False, description="also return the most harmful examples")
    images: bool = Field(False, description="add inline PNG images (tasks with image())")

    @field_validator("example", "k", mode="before")
    @classmethod
    def _no_bools(cls, v):
        """JSON ``true`` is not an example number (pydantic's lax mode would take it as 1)."""
        if isinstance(v, bool):
            raise PydanticCustomError("int_type", "Input should be a valid integer")
        return v

    @field_validator("k")
    @classmethod
    def _k_within_limit(cls, v: int, info: ValidationInfo):
        limit = (info.context or {}).get("max_k")
        if limit is not None and v > limit:
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal "
                                      "to {le}", dict(le=limit))
        return v

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, v):
        if v is not None and not v.strip():
            raise PydanticCustomError("text_empty", "text must be a non-empty string")
        return v
