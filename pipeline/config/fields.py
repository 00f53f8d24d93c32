"""The field types of params.yaml's sections: each carries its bounds and the phrase its error message
uses ("must be an integer >= 1, got 0"), so a section declares a field in one line."""

import difflib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict
from pydantic_core import PydanticCustomError

from pipeline.core.devices import DEVICE_NAMES, is_device_name


def wanted(text: str) -> Any:
    return Field(json_schema_extra={"wanted": text})


def fail(*problems: str):
    """Several problems from one validator, each a line of the report (`key: message`)."""
    raise PydanticCustomError("problems", "{problems}", {"problems": list(problems)})


def invalid():
    """A value its field's phrase describes the fix for."""
    raise PydanticCustomError("invalid", "invalid value")


def no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def Integer(minimum: int, maximum: int | None = None) -> Any:
    text = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    return Annotated[int, Strict(), Field(ge=minimum, le=maximum), wanted(text)]


def Number(minimum: float, above: bool = False, below: float | None = None) -> Any:
    """A finite number; YAML reads 1e-3 as a string, which is accepted."""
    text = f"a number {'>' if above else '>='} {minimum}" + (f" and < {below}" if below is not None else "")
    bounds = {"gt" if above else "ge": minimum, "lt": below}
    return Annotated[float, BeforeValidator(no_bool), Field(allow_inf_nan=False, **bounds), wanted(text)]


def Choice(choices: tuple[str, ...]) -> Any:
    return Annotated[Literal[choices], wanted(f"one of {list(choices)}")]


def once_each(values: tuple) -> tuple:
    """A list whose items are distinct; else the field's own phrase says what it must be."""
    return values if len(set(values)) == len(values) else invalid()


def distinct_integers(values: tuple) -> tuple:
    if len(set(values)) != len(values):
        raise PydanticCustomError("wanted", "a list of distinct integers")
    return values


def Names(choices: tuple[str, ...]) -> Any:
    """A non-empty list drawn from `choices`, each once: an empty list would run nothing and exit 0."""
    return Annotated[tuple[Literal[choices], ...], Field(min_length=1), AfterValidator(once_each),
                     wanted(f"a non-empty list drawn from {list(choices)}, each once")]


def Widths() -> Any:
    return Annotated[tuple[Annotated[int, Strict(), Field(ge=1)], ...], wanted("a list of integers >= 1")]


Flag = Annotated[bool, Strict(), wanted("true or false")]
Text = Annotated[str, Strict(), Field(min_length=1, pattern=r"\S"), wanted("a non-empty string")]
Device = Annotated[str, AfterValidator(lambda v: v if is_device_name(v) else invalid()), wanted(DEVICE_NAMES)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dicts and lists (consumers index it; results.json records it)."""
        return self.model_dump(mode="json")


def closest(name: str, known) -> str:
    """` (did you mean 'x'?)` for a misspelt key, or nothing."""
    match = difflib.get_close_matches(str(name), sorted(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
