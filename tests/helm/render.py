#!/usr/bin/env python3
"""Renders the Helm chart with the Helm library itself and checks what comes out.

Used by tests/tests/chart.rs, and by hand:

    python3 tests/helm/render.py render deploy/helm/modelcache [--values FILE]... [--set-json JSON]
    python3 tests/helm/render.py load examples/*.yaml

`render` lints the chart strictly (a warning fails), renders it offline, and validates every
manifest, strictly (no unknown fields), against the Kubernetes API schemas of the oldest and newest
Kubernetes the chart supports. `load` validates plain manifest files the same way. Both print
JSON on stdout: {"objects": [{"source": ..., "object": {...}}], "notes": "..."}.

Exit status: 0 on success; 1 when Helm refuses the values or a template fails (the message on
stderr is Helm's, for the test to check); 2 when lint or validation finds a problem.
"""

import argparse
import json
import sys

import helm_python as helm
import kubernetes_validate
import yaml

# The chart's kubeVersion floor, and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]


def validate(source, obj):
    problems = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(top)"
            problems.append(
                f"{source}: {obj.get('kind')} {obj.get('metadata', {}).get('name')}: "
                f"Kubernetes {version}: {where}: {e.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{source}: no Kubernetes {version} schema for {obj.get('kind')}: {e}")
    return problems


def documents(source, text):
    for obj in yaml.safe_load_all(text):
        if obj is not None:
            yield source, obj


def merged_values(files, set_json):
    values = {}
    for f in files:
        with open(f) as fh:
            deep_merge(values, yaml.safe_load(fh) or {})
    if set_json:
        deep_merge(values, json.loads(set_json))
    return values


def deep_merge(into, new):
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            deep_merge(into[k], v)
        else:
            into[k] = v


def render(args):
    values = merged_values(args.values, args.set_json)
    report = helm.lint(args.chart, values, strict=True, namespace=args.namespace)
    findings = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    if findings or report.get("errors"):
        lines = [f"lint: {m.get('path')}: {m.get('error')}".strip() for m in findings]
        lines += [f"lint: {e}".strip() for e in report.get("errors") or []]
        print("\n".join(dict.fromkeys(lines)), file=sys.stderr)
        # A template that fails on these values is a refusal, not a lint finding.
        text = " ".join(str(m.get("error")) for m in findings) + " ".join(report.get("errors") or [])
        return 1 if ("execution error" in text or "values don't meet" in text) else 2
    with helm.Chart.load(args.chart) as chart:
        manifests = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    notes = ""
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(documents(path, text))
    return emit(objects, notes)


def load(args):
    objects = []
    for f in args.files:
        with open(f) as fh:
            objects.extend(documents(f, fh.read()))
    return emit(objects, "")


def emit(objects, notes):
    problems = [p for source, obj in objects for p in validate(source, obj)]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    out = {"objects": [{"source": s, "object": o} for s, o in objects], "notes": notes}
    json.dump(out, sys.stdout)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="lint, render and validate the chart")
    r.add_argument("chart")
    r.add_argument("--values", action="append", default=[], help="a values file (repeatable)")
    r.add_argument("--set-json", help="values as JSON, merged last")
    r.add_argument("--name", default="modelcache", help="release name")
    r.add_argument("--namespace", default="modelcache", help="release namespace")
    r.set_defaults(run=render)
    lo = sub.add_parser("load", help="validate manifest files")
    lo.add_argument("files", nargs="+")
    lo.set_defaults(run=load)
    args = p.parse_args()
    try:
        sys.exit(args.run(args))
    except helm.HelmError as e:
        print(f"helm: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
