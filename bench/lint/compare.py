"""Compares squawk's findings with upshift's on the same migration files.

Reads both tools' JSON reports and prints, per rule, the files where both report it, where
only upshift does, and where only squawk does; then the rules each tool has that the other
has no counterpart for. A finding counts per file: both tools report the statement's file.
"""

import argparse
import collections
import json
import pathlib

# upshift rule -> the squawk rules that report the same problem.
SAME = {
    "index-without-concurrently": ["require-concurrent-index-creation"],
    "drop-index-without-concurrently": ["require-concurrent-index-deletion"],
    "not-null-without-default": ["adding-required-field"],
    "constraint-without-not-valid": ["constraint-missing-not-valid", "adding-foreign-key-constraint"],
    "unique-without-index": ["disallowed-unique-constraint", "adding-serial-primary-key-field"],
    "column-type-change": ["changing-column-type"],
    "set-not-null-without-check": ["adding-not-nullable-field"],
    "add-column-rewrites-table": ["adding-field-with-default"],
    "missing-lock-timeout": ["require-lock-timeout"],
    "rename-table": ["renaming-table"],
    "rename-column": ["renaming-column"],
    "drop-table": ["ban-drop-table"],
    "drop-column": ["ban-drop-column"],
}


def up_file(path):
    """The revision file a finding belongs to (a down file's findings count for its up file)."""
    name = pathlib.Path(path).name
    return name.replace(".down.sql", ".up.sql")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--squawk", required=True, nargs="+", help="squawk --reporter json outputs")
    parser.add_argument("--upshift", required=True, help="upshift migrate lint --output json output")
    args = parser.parse_args()
    squawk = collections.defaultdict(set)
    for report in args.squawk:
        for finding in json.loads(pathlib.Path(report).read_text()):
            squawk[finding["rule_name"]].add(up_file(finding["file"]))
    upshift = collections.defaultdict(set)
    for finding in json.loads(pathlib.Path(args.upshift).read_text()):
        upshift[finding["rule"]].add(up_file(finding["file"]))

    rows = []
    notes = []
    matched_squawk = set()
    for rule, equivalents in SAME.items():
        theirs = set().union(*(squawk.get(r, set()) for r in equivalents))
        matched_squawk.update(equivalents)
        ours = upshift.get(rule, set())
        rows.append((rule, ", ".join(equivalents), len(ours & theirs), len(ours - theirs), len(theirs - ours)))
        for name in sorted(ours - theirs):
            notes.append(f"  {rule}: only upshift in {name}")
        for name in sorted(theirs - ours):
            notes.append(f"  {rule}: only squawk in {name}")

    print("Rules both have: files where each reports it")
    header = ("upshift rule", "squawk rule(s)", "both", "only upshift", "only squawk")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    line = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(header))
    print(line(tuple("-" * w for w in widths)))
    for row in rows:
        print(line(row))
    if notes:
        print("\nWhere they differ:")
        print("\n".join(notes))

    print("\nRules only squawk has: files")
    for rule in sorted(set(squawk) - matched_squawk):
        print(f"  {rule:28} {len(squawk[rule]):3}  {some(squawk[rule])}")
    print("\nRules only upshift has: files")
    for rule in sorted(set(upshift) - set(SAME)):
        print(f"  {rule:28} {len(upshift[rule]):3}  {some(upshift[rule])}")


def some(names, shown=3):
    """A few of the file names, for the reader to look at."""
    names = sorted(names)
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


if __name__ == "__main__":
    main()
