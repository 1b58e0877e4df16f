"""The JSON Schema of bnfold's reports (report.schema.json, shipped with the package) and its version.

Every top-level document bnfold writes carries ``"schema_version": SCHEMA_VERSION``. Adding a field
keeps the version; removing or renaming a field, or changing its type or meaning, bumps it, so a
script can check the one number before it reads anything else (docs/report.md). Validating needs
the ``jsonschema`` package, which bnfold itself does not depend on: it is imported on first use.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from .errors import BnfoldError

SCHEMA_VERSION = 1
SCHEMA_FILE = "report.schema.json"
DOCUMENTS = ("fold_report", "models_document", "verify_report", "bench_report")  # the schema's top-level $defs


def load_schema() -> dict:
    """The schema, as a fresh dict."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def validate(document: dict, kind: str | None = None) -> None:
    """Raise a one-line BnfoldError unless `document` (parsed JSON) is a valid bnfold report.

    `kind` (one of DOCUMENTS) says which document it must be; by default, the one whose required
    fields it has most of, so that the message names the field at fault rather than saying only that
    no kind of document matches. The jsonschema error is the BnfoldError's ``__cause__``."""
    if kind is not None and kind not in DOCUMENTS:
        raise BnfoldError(f"{kind!r} is not a bnfold document; choose from {', '.join(DOCUMENTS)}")
    if not isinstance(document, dict):
        raise BnfoldError(f"a bnfold report is a JSON object, not {type(document).__name__}")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        found = "no schema_version" if version is None else f"schema_version {version!r}"
        raise BnfoldError(f"the report has {found}; this bnfold's schema is version {SCHEMA_VERSION}",
                          note="validate it with the bnfold release that wrote it")
    kind = kind or _likely_kind(document)
    error = _best_error(_validator(kind), document)
    if error is not None:
        raise BnfoldError(f"not a valid bnfold {kind} (schema version {SCHEMA_VERSION}): at {error.json_path}: "
                          f"{_message(error)}") from error


@lru_cache(maxsize=None)
def _validator(kind: str):
    try:
        import jsonschema
    except ImportError:
        raise BnfoldError("validating a report needs the jsonschema package",
                          note="pip install 'jsonschema>=4.18'") from None
    schema = {key: value for key, value in load_schema().items() if key != "oneOf"}
    return jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{kind}"})


def _likely_kind(document: dict) -> str:
    """The top-level document whose required fields `document` has most of (the first on a tie)."""
    defs = _defs()
    return max(DOCUMENTS, key=lambda kind: len(set(defs[kind]["required"]) & set(document)))


@lru_cache(maxsize=None)
def _defs() -> dict:
    return load_schema()["$defs"]


def _best_error(validator, document):
    from jsonschema.exceptions import best_match
    return best_match(validator.iter_errors(document))


def _message(error) -> str:
    """jsonschema's message on one line, without the whole list of an enum."""
    if error.validator == "enum":
        return f"{error.instance!r} is not one of the {len(error.validator_value)} values the schema allows"
    return " ".join(error.message.split())
