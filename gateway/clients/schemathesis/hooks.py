"""schemathesis hooks for cli/tests/contract.rs (`schemathesis_finds_nothing`),
loaded through SCHEMATHESIS_HOOKS.

`documented_rules_accept_valid_data` takes the place of schemathesis's
`positive_data_acceptance` (which the test excludes, saying why). The
document states every rule HCP enforces on a request's shape, so a request
the document calls valid must never be refused by one of them; HCP's 400
for a broken rule carries `details.rule`, the JSON Schema keyword of the
rule. A valid request may still be refused for what no schema can state:
a flavor that does not exist, a page token HCP did not issue, a disk that
would shrink, an Idempotency-Key used before with another request (422), a
VM busy with a job (409). Those answers carry no `details.rule`, and this
check accepts them; any 400 with a rule, or without the Error body naming
its field, is a failure.
"""

import json

import schemathesis


@schemathesis.check
def documented_rules_accept_valid_data(ctx, response, case):
    """A schema-valid request is never refused by a documented rule."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    try:
        body = json.loads(response.content.decode("utf-8"))
    except ValueError as exc:
        raise AssertionError(f"a 400 without the Error body: {exc}") from exc
    details = body.get("details") or {}
    if "field" not in details:
        raise AssertionError(f"a 400 that names no field: {body.get('message')!r}")
    if "rule" in details:
        raise AssertionError(
            f"a request the document calls valid was refused by the rule {details['rule']!r} "
            f"on {details['field']!r}: {body.get('message')!r}"
        )
    return None
