"""Reads schemathesis's NDJSON reports and tells what they found, for
cli/tests/contract.rs and whoever fixes what it finds.

    python report.py --json summary.json NAME=run.ndjson [NAME=run.ndjson ...]

NAME labels a run (e.g. the token it used). Prints a catalogue of the
distinct failures, grouped by check: one entry per (run, check, operation,
response status) with how often it happened, the response and a
curl line that reproduces it. Writes to --json the failures and, per run
and operation, the response statuses seen (so the test can tell that the
success paths were reached). Exits 0 either way: the test decides.
"""

import argparse
import base64
import json
import shlex
import sys
from collections import defaultdict

BODY_CHARS = 300
# Entries of one check shown with their response and curl line.
DETAILED = 12


def text_of(payload):
    """A recorded body (base64 or text) as text, or ''."""
    if not payload:
        return ""
    if isinstance(payload, dict) and "$base64" in payload:
        return base64.b64decode(payload["$base64"]).decode("utf-8", errors="replace")
    if isinstance(payload, dict) and "string" in payload:
        return payload["string"]
    return str(payload)


def curl(request):
    parts = ["curl", "-sS", "-X", request["method"]]
    for name, values in (request.get("headers") or {}).items():
        if name.lower() in ("user-agent", "x-schemathesis-testcaseid", "accept-encoding", "connection", "accept"):
            continue
        for value in values if isinstance(values, list) else [values]:
            parts += ["-H", f"{name}: {value}"]
    body = text_of(request.get("body"))
    if body:
        parts += ["--data-raw", body]
    parts.append(request["uri"])
    return " ".join(shlex.quote(p) for p in parts)


def one_line(text, limit=BODY_CHARS):
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def read(name, path, failures, statuses, errors):
    with open(path, encoding="utf-8") as f:
        for line in f:
            event = json.loads(line)
            if "NonFatalError" in event or "FatalError" in event:
                err = event.get("NonFatalError") or event.get("FatalError")
                errors.append({"run": name, "error": one_line(json.dumps(err), 600)})
                continue
            finished = event.get("ScenarioFinished")
            if not finished:
                continue
            recorder = finished["recorder"]
            interactions = recorder.get("interactions") or {}
            cases = recorder.get("cases") or {}
            for case_id, interaction in interactions.items():
                case = (cases.get(case_id) or {}).get("value") or {}
                operation = f"{interaction['request']['method']} {case.get('path', '?')}"
                response = interaction.get("response") or {}
                # Requests with another method than the scenario's
                # operation are the checks' probes of undeclared methods.
                if operation == recorder.get("label") and "status_code" in response:
                    statuses[name][operation].add(response["status_code"])
            for case_id, checks in (recorder.get("checks") or {}).items():
                for check in checks:
                    if check.get("status") != "failure":
                        continue
                    failure = (check.get("failure_info") or {}).get("failure") or {}
                    interaction = interactions.get(case_id) or {}
                    request = interaction.get("request") or {}
                    response = interaction.get("response") or {}
                    message = failure.get("message", "").splitlines()[0] if failure.get("message") else ""
                    key = (
                        name,
                        failure.get("code", check["name"]),
                        failure.get("operation", "?"),
                        response.get("status_code"),
                    )
                    entry = failures.get(key)
                    if entry is None:
                        failures[key] = entry = {
                            "run": name,
                            "check": check["name"],
                            "code": failure.get("code", ""),
                            "title": failure.get("title", check["name"]),
                            "operation": failure.get("operation", "?"),
                            "message": message,
                            "request": f"{request.get('method', '?')} {request.get('uri', '?')}",
                            "status": response.get("status_code"),
                            "response": one_line(text_of(response.get("content"))),
                            "curl": curl(request) if request else "",
                            "count": 0,
                        }
                    entry["count"] += 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("runs", nargs="+", metavar="NAME=NDJSON")
    args = parser.parse_args()
    failures, errors = {}, []
    statuses = defaultdict(lambda: defaultdict(set))
    for run in args.runs:
        name, _, path = run.partition("=")
        read(name, path, failures, statuses, errors)

    by_check = defaultdict(list)
    for entry in failures.values():
        by_check[(entry["code"], entry["title"])].append(entry)
    for (code, title), entries in sorted(by_check.items()):
        print(f"== {code} {title} ({len(entries)} distinct)")
        for i, e in enumerate(sorted(entries, key=lambda e: (e["operation"], e["run"], str(e["status"])))):
            print(f"- [{e['run']}] {e['operation']}: {e['request']} -> {e['status']} ×{e['count']}")
            # A check failing everywhere the same way (e.g. every path's
            # undeclared methods) is shown in full a few times, then listed.
            if i >= DETAILED:
                continue
            if e["message"]:
                print(f"    why: {one_line(e['message'])}")
            print(f"    response: {e['response']}")
            print(f"    reproduce: {e['curl']}")
    for err in errors:
        print(f"== error [{err['run']}]: {err['error']}")
    print("== operations that never answered 2xx (their success path was not reached)")
    for run, ops in statuses.items():
        for op, codes in sorted(ops.items()):
            if not any(200 <= c < 300 for c in codes):
                print(f"- [{run}] {op}: {sorted(codes)}")

    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(
            {
                "failures": list(failures.values()),
                "errors": errors,
                "statuses": {
                    run: {op: sorted(codes) for op, codes in sorted(ops.items())} for run, ops in statuses.items()
                },
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    sys.exit(main())
