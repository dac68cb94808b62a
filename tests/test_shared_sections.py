"""The scripts copy each other on purpose; the copies must stay honest, and each must read alone.

A shared section starts with a line `# >>> shared: <name>` and ends with `# <<< shared: <name>`. Every script
has the same sections, in the same order, and each section is byte-identical across scripts.
"""

import re

from conftest import SCRIPTS, TEMPLATE

MARKER = re.compile(r"^ *# (>>>|<<<) shared: (\S+)$", re.MULTILINE)
# The banners, in order: the docstring of every script lists the same eight sections by number.
SECTION_HEADINGS = [
    "# 1. Imports",
    "# 2. Arguments",
    "# 3. Domain defaults",
    "# 4. Parsing and checking the command line",
    "# 5. Environments",
    "# 6. Network",
    "# 7. Profiling helpers",
    "# 8. Training",
]
DOCSTRING_SECTIONS = [
    "1. imports",
    "2. arguments",
    "3. the domain-defaults table",
    "4. parsing and checking the command line",
    "5. environments",
    "6. the network",
    "7. profiling helpers",
    "8. training",
]
# What a copied script cannot follow: documents and files it does not ship with.
EXTERNAL_REFERENCES = re.compile(r"DESIGN|invariant \d|docs/|tests/|README|\.md\b|benchmarks/")
REQUIRED = {"imports", "args", "parse_args", "environments", "encoders", "agent", "profiling", "main"}


def shared_sections(text: str) -> dict[str, str]:
    """Name -> text between its markers; raises on unbalanced or nested markers."""
    sections, open_name, open_end = {}, None, 0
    for match in MARKER.finditer(text):
        kind, name = match.groups()
        if kind == ">>>":
            assert open_name is None, f"section {name!r} opens inside {open_name!r}"
            assert name not in sections, f"section {name!r} appears twice"
            open_name, open_end = name, match.end()
        else:
            assert name == open_name, f"section {name!r} closes but {open_name!r} is open"
            sections[name] = text[open_end : match.start()]
            open_name = None
    assert open_name is None, f"section {open_name!r} never closes"
    return sections


def test_marker_parser_catches_mistakes():
    good = "# >>> shared: a\nx = 1\n# <<< shared: a\n"
    assert shared_sections(good) == {"a": "\nx = 1\n"}
    for bad in ("# >>> shared: a\n", "# >>> shared: a\n# <<< shared: b\n", good + good):
        try:
            shared_sections(bad)
        except AssertionError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_template_has_every_shared_section():
    assert set(shared_sections(TEMPLATE.read_text())) >= REQUIRED


def test_shared_sections_are_identical_across_scripts():
    reference = shared_sections(TEMPLATE.read_text())
    for script in SCRIPTS:
        sections = shared_sections(script.read_text())
        assert list(sections) == list(reference), f"{script.name} has sections {list(sections)}"
        for name, text in reference.items():
            assert sections[name] == text, f"{script.name}: section {name!r} differs from {TEMPLATE.name}"


def test_sections_are_numbered_from_one_as_the_docstring_says():
    for script in SCRIPTS:
        text = script.read_text()
        assert text.startswith('"""'), f"{script.name} must open with its docstring"
        docstring = " ".join(text[3 : text.index('"""', 3)].split())
        banners = re.findall(r"^# \d+\. .*$", text, re.MULTILINE)
        assert [b for b, h in zip(banners, SECTION_HEADINGS, strict=True) if b.startswith(h)] == banners, banners
        positions = [docstring.index(section) for section in DOCSTRING_SECTIONS]
        assert positions == sorted(positions), f"{script.name}: the docstring lists the sections out of order"
        assert text.index("# 1. Imports") < text.index("import torch") < text.index("# 2. Arguments")


def test_a_copied_script_reads_alone():
    """No document, test or benchmark of ours, and no other script of the set but the template, which every
    docstring names as what it differs from."""
    for script in SCRIPTS:
        for number, line in enumerate(script.read_text().splitlines(), 1):
            assert not EXTERNAL_REFERENCES.search(line), f"{script.name}:{number} points elsewhere: {line.strip()}"
            siblings = {f"{name}.py" for name in re.findall(r"\b(ppo_\w+)\.py", line)} & {s.name for s in SCRIPTS}
            assert siblings <= {script.name, TEMPLATE.name}, f"{script.name}:{number} names {siblings}"


def test_density_near_cleanrl():
    """At most 5 lines over 110 characters (CleanRL's ppo.py: 3), no formatter opt-outs, no assignment hidden
    inside another statement."""
    for script in SCRIPTS:
        lines = script.read_text().splitlines()
        assert sum(len(line) > 110 for line in lines) <= 5, script.name
        for number, line in enumerate(lines, 1):
            assert "fmt: skip" not in line and "fmt: off" not in line, f"{script.name}:{number}"
            assert ":=" not in line.split("#")[0], f"{script.name}:{number} {line.strip()}"


def test_scripts_do_not_import_each_other():
    for script in SCRIPTS:
        assert not re.search(r"^\s*(from|import) ppo_", script.read_text(), re.MULTILINE), script.name
