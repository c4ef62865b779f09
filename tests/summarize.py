#!/usr/bin/env python3
"""Count test results for scripts/test.

--count DIR: read every JUnit XML file in DIR (cmocka's and pytest's) and
print "N passed, N failed, N skipped"; each *.failed marker file counts as
one failure (a build that broke, a suite that could not start).

--meson-log FILE --junit-dir DIR --missing-to OUT: for every unit test that
meson ran but that left no report in DIR (it crashed before writing one),
write a JUnit file OUT with one failed case per such test.
"""
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET


def count(results_dir):
    passed = failed = skipped = 0
    for path in sorted(glob.glob(os.path.join(results_dir, "*.xml"))):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            failed += 1
            continue
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed += 1
            elif case.find("skipped") is not None:
                skipped += 1
            else:
                passed += 1
    failed += len(glob.glob(os.path.join(results_dir, "*.failed")))
    print(f"{passed} passed, {failed} failed, {skipped} skipped")


def missing(meson_log, junit_dir, out):
    cases = []
    try:
        with open(meson_log) as f:
            runs = [json.loads(line) for line in f if line.strip()]
    except OSError:
        runs = []
    for run in runs:
        name = run.get("name", "?").split(":")[-1].strip()
        report = os.path.join(junit_dir, f"unit-{name}.xml")
        if os.path.exists(report) and os.path.getsize(report) > 0:
            # A report exists, but the binary may still have died after it
            # (a sanitizer at exit): trust meson's verdict too.
            if run.get("result") in ("OK", "SKIP", "EXPECTEDFAIL"):
                continue
            try:
                root = ET.parse(report).getroot()
                if any(c.find("failure") is not None for c in root.iter("testcase")):
                    continue  # already counted as a failed case
            except ET.ParseError:
                pass
        elif run.get("result") in ("OK", "SKIP"):
            continue
        cases.append((name, run.get("result", "?"), run.get("stdout", "")[-2000:]))
    if not cases:
        return
    suite = ET.Element("testsuite", name="unit-binaries")
    for name, result, tail in cases:
        case = ET.SubElement(suite, "testcase", name=f"{name} binary")
        ET.SubElement(case, "failure", message=f"{name}: {result}").text = tail
    ET.ElementTree(suite).write(out)


def main(argv):
    if len(argv) == 3 and argv[1] == "--count":
        count(argv[2])
        return 0
    args = dict(zip(argv[1::2], argv[2::2]))
    if {"--meson-log", "--junit-dir", "--missing-to"} <= args.keys():
        missing(args["--meson-log"], args["--junit-dir"], args["--missing-to"])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
