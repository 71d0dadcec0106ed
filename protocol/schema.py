"""The `schema` field every payload carries, and decoding with clear reasons.

`jetfleet.<kind>/v<major>[.<minor>]`: unknown fields are ignored (newer minor versions
add fields), a missing schema or another major version is rejected.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocol.errors import MessageError, SchemaError

_SCHEMA_RE = re.compile(r"^jetfleet\.([a-z_]+)/v(\d+)(?:\.(\d+))?$")

M = TypeVar("M", bound="Document")


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "document"
    return f"{loc}: {e['msg']}"


class Document(BaseModel):
    """A versioned JSON document of kind `KIND`; subclasses set KIND and MAJOR."""

    KIND: ClassVar[str] = ""
    MAJOR: ClassVar[int] = 1

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=False)

    schema_: str = Field(default="", alias="schema")

    @model_validator(mode="before")
    @classmethod
    def _check_schema(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            expected = f"jetfleet.{cls.KIND}/v{cls.MAJOR}"
            got = data.get("schema", data.get("schema_"))
            if got is None:
                raise SchemaError(f"missing 'schema' field (expected {expected!r})")
            m = _SCHEMA_RE.match(got) if isinstance(got, str) else None
            if not m:
                raise SchemaError(f"schema {got!r} is not of the form jetfleet.<kind>/v<major>")
            if m[1] != cls.KIND:
                raise SchemaError(f"schema {got!r} is a {m[1]} document, expected {expected!r}")
            if int(m[2]) != cls.MAJOR:
                raise SchemaError(
                    f"schema {got!r} has major version {m[2]}, this side speaks {expected!r}"
                )
            data["schema"] = got
            data.pop("schema_", None)
        return data

    @classmethod
    def schema_id(cls) -> str:
        return f"jetfleet.{cls.KIND}/v{cls.MAJOR}"

    @classmethod
    def new(cls: type[M], **fields: Any) -> M:
        """Build a document with its own schema id filled in."""
        return cls.model_validate({"schema": cls.schema_id(), **fields})

    @classmethod
    def decode(cls: type[M], payload: bytes | str | dict[str, Any]) -> M:
        """Parse JSON (bytes, str or an already-parsed dict); MessageError with the reason."""
        if isinstance(payload, (bytes, bytearray, memoryview)):
            try:
                payload = bytes(payload).decode("utf-8")
            except UnicodeDecodeError as e:
                raise MessageError(f"{cls.KIND}: payload is not UTF-8 ({e.reason})") from e
        if isinstance(payload, str):
            try:
                payload = json.loads(payload)
            except (json.JSONDecodeError, RecursionError) as e:
                raise MessageError(f"{cls.KIND}: payload is not JSON ({e})") from e
        if not isinstance(payload, dict):
            raise MessageError(f"{cls.KIND}: payload must be a JSON object")
        # ProtocolErrors raised by our validators are not ValueErrors, so pydantic lets
        # them through unwrapped with their specific class and code.
        try:
            return cls.model_validate(payload)
        except ValidationError as e:
            raise MessageError(f"invalid {cls.KIND}: {_first_error(e)}") from e

    def encode(self) -> bytes:
        """Compact UTF-8 JSON with `schema` first-class (by alias), None fields left out."""
        return self.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
